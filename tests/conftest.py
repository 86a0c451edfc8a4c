"""Every test sees 8 emulated CPU devices; this must run before any JAX use."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As the scripts do (see experiments/__init__.py): LAPACK calls already run side by side.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Compiled programs are cached on disk, shared by the test workers and by the scripts the
# tests start (they inherit this environment): dozens of subprocess runs compile the same
# tiny train step. A program loaded from the cache is the same program; only compile time
# is saved (about a quarter of tests/test_train.py's time on 2 cores).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ravine-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The tests' programs are tiny, so compiling them is most of the suite's time, and most of a
# compile is LLVM optimising machine code. Without it the same HLO (the same fusions,
# collectives and buffer assignment: what the tests read from compiled programs) compiles 2-3x
# faster and runs a little slower (test_sharding.py's Shampoo meshes: 201 s -> 78 s). Set
# here, so the scripts the tests start inherit it too.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


# `make test` runs each file whole on one of 2 workers (--dist loadfile), handing files out
# in collection order (the Makefile turns off xdist's reordering by test count): a heavy file
# collected last runs alone at the end. Heaviest first, by the seconds each took in a full
# run from a clean clone (2026-12-06, 2 cores, 17:16 UTC); the order of tests within a file
# is kept.
HEAVY_FILES_FIRST = ("test_race.py", "test_benchmarks.py", "test_train.py", "test_workflow.py",
                     "test_first_order.py", "test_clients.py", "test_sharding.py",
                     "test_demos.py", "test_optax_contrib.py", "test_pipeline.py",
                     "test_kfac.py", "test_optax_alias.py", "test_shampoo.py", "test_muon.py",
                     "test_models.py", "test_accounting_hlo.py", "test_scaling_study.py",
                     "test_mup_demos.py", "test_lessons.py",
                     "test_train_sophia_schedule_free.py", "test_mup.py",
                     "test_new_optimizers.py", "test_bench.py", "test_diagnostics.py",
                     "test_landscape.py", "test_lesson_warmup.py", "test_faults.py",
                     "test_blocks.py", "test_readme.py", "test_zero.py", "test_soap.py",
                     "test_sophia.py", "test_speedup_study.py", "test_packaging.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


import sys  # noqa: E402

import pytest  # noqa: E402

from ravine.optim import registry  # noqa: E402


TESTS = os.path.dirname(os.path.realpath(__file__)) + os.sep
TEMP = os.path.realpath(tempfile.gettempdir()) + os.sep


@pytest.fixture(autouse=True, scope="module")
def user_registrations_end_with_their_file():
    """A file that registers a user's optimizer (tests/user_optimizer.py, README's my_opt.py)
    takes it away again when it ends: the registry is global, and a worker runs many files,
    so test_optax_alias.py's "every optimizer has a configuration" would otherwise see
    whichever user names an earlier file left. The modules that registered them are
    forgotten too, so the next file that imports one registers its names afresh."""
    names, modules = {s.name for s in registry.specs()}, set(sys.modules)
    yield
    for name in {s.name for s in registry.specs()} - names:
        if registry.registered(name) is not None:  # a user's name (built-ins stay)
            registry.unregister(name)
    for module in set(sys.modules) - modules:
        origin = os.path.realpath(getattr(sys.modules[module], "__file__", None) or "/")
        if origin.startswith((TESTS, TEMP)):  # tests/user_optimizer.py, a tmp_path's my_opt.py
            del sys.modules[module]
