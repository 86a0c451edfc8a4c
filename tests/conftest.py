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

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
