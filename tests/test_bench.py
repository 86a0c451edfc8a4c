"""The benchmark job (issue 29): workloads as objects, search spaces from the optimizers'
specs, trials sharing one vmapped program, the smoke preset, exit 2, resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ravine import models, optim
from ravine.experiments import bench, scoring, workloads
from ravine.experiments.runtime import cli, user_modules
from tests.scripts import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A user's workload, as a user module would register it: 2-D least squares, 8 x 2 weights.
USER_MODULE = '''
import jax, jax.numpy as jnp, numpy as np
from ravine.experiments import workloads

def user_lines(steps=40):
    w_star = np.linspace(-1, 1, 16, dtype=np.float32).reshape(8, 2)

    def batch(seed, step):
        x = np.random.default_rng([seed, step]).standard_normal((8, 8)).astype(np.float32)
        return x, x @ w_star

    return workloads.Workload(
        name="user_lines", description="8 x 2 least squares, 40 steps of 8", steps=steps,
        init=lambda key: {"w": jax.random.normal(key, (8, 2))},
        loss_fn=lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2), batch=batch,
        eval=lambda p: jnp.sum((p["w"] - w_star) ** 2), batch_size=8, n_params=16,
        data="Gaussian inputs, noiseless targets", metric="squared distance to W*")

workloads.register("user_lines", user_lines)
'''


@pytest.fixture(scope="module")
def user_workload(tmp_path_factory):
    """Registers `user_lines` from a module file, as `--workload_module=FILE` does."""
    path = tmp_path_factory.mktemp("user") / "user_workloads.py"
    path.write_text(USER_MODULE)
    if "user_lines" not in workloads.available():
        user_modules.import_user_module(str(path))
    yield str(path)
    workloads.unregister("user_lines")


def my_sgd(learning_rate, momentum=0.9, refresh_every=4):
    """A user's optimizer whose spec declares its own knobs (one of them an int: static)."""
    del refresh_every
    return optax.sgd(learning_rate, momentum=momentum)


@pytest.fixture(scope="module")
def user_optimizer():
    optim.register("bench_my_sgd", my_sgd, centre_lr=0.05,
                   search_space={"momentum": (0.5, 0.95, "linear"),
                                 "refresh_every": (2, 8, "log")})
    yield "bench_my_sgd"
    optim.unregister("bench_my_sgd")


# ------------------------------------------------------------------------- the workloads

def test_workload_registry_lists_builds_and_refuses():
    names = workloads.available()
    assert len(names) >= 4
    for name in ("noisy_quadratic", "digits_mlp", "digits_cnn", "digits_autoencoder",
                 "lm_tiny"):
        assert name in names
    for name in ("noisy_quadratic", "digits_mlp", "digits_cnn", "digits_autoencoder"):
        wl = workloads.get(name)
        assert isinstance(wl, workloads.Workload) and wl.name == name
        assert wl.n_params == workloads.count(wl.init)
        assert str(wl.steps) in wl.description and wl.data and wl.metric
        first, again, other = wl.batch(0, 3), wl.batch(0, 3), wl.batch(1, 3)
        jax.tree.map(np.testing.assert_array_equal, first, again)   # seekable
        assert not np.array_equal(jax.tree.leaves(first)[0], jax.tree.leaves(other)[0])
        assert jax.tree.leaves(first)[0].shape[0] == wl.batch_size
        params = jax.eval_shape(wl.init, jax.random.key(0))
        assert jax.eval_shape(wl.loss_fn, params, first).shape == ()
        assert jax.eval_shape(wl.eval, params).shape == ()
    quadratic = workloads.get("noisy_quadratic")
    assert float(quadratic.eval(quadratic.init(jax.random.key(0)))) > 0  # excess risk
    with pytest.raises(ValueError, match="already taken.*noisy_quadratic"):
        workloads.register("noisy_quadratic", workloads.noisy_quadratic)
    with pytest.raises(ValueError, match="unknown workload 'nope'.*digits_mlp"):
        workloads.get("nope")
    with pytest.raises(ValueError, match="identifier"):
        workloads.register("a/b", workloads.noisy_quadratic)
    with pytest.raises(ValueError, match="was not added by register"):
        workloads.unregister("digits_mlp")


def test_lm_ladder_spans_16x_in_params():
    counts = []
    for size, shape in workloads.LM_LADDER.items():
        assert f"lm_{size}" in workloads.available()
        shape = dict(shape)
        seq_len = shape.pop("seq_len")
        shape.pop("batch_size")
        model = models.Transformer(models.TransformerConfig(max_len=seq_len, **shape))
        counts.append(models.count_params(jax.eval_shape(
            lambda key, m=model, t=seq_len: nn.unbox(m.init(key, jnp.zeros((1, t),
                                                                            jnp.int32))),
            jax.random.key(0))))
    assert len(counts) >= 4 and counts == sorted(counts) and counts[-1] >= 16 * counts[0]
    assert list(workloads.LM_LADDER)[0] == "tiny"


# ------------------------------------------------------------------------ search spaces

def test_search_space_comes_from_the_spec(user_optimizer):
    space = bench.search_space(user_optimizer, lr_factor=10.0)
    assert space["learning_rate"] == pytest.approx((0.005, 0.5, "log"))
    assert space["momentum"] == (0.5, 0.95, "linear") and "refresh_every" in space
    assert "b2" not in space and "weight_decay" not in space   # my_sgd takes neither
    assert bench.static_knobs(user_optimizer, space) == ["refresh_every"]
    # built-ins: AdamW's common knobs, Muon's own (its AdamW leaves' lr), Schedule-Free's
    # warmup goes to its own argument (constant lr)
    assert set(bench.search_space("adamw")) == {"learning_rate", "weight_decay",
                                               "warmup_fraction", "b2"}
    assert "adam_learning_rate" in bench.search_space("muon")
    trials = bench.sample_trials(space, 5, study=0)
    assert trials == bench.sample_trials(space, 5, study=0)
    assert trials != bench.sample_trials(space, 5, study=1)
    for trial in trials:
        assert 0.005 <= trial["learning_rate"] <= 0.5 and 0.5 <= trial["momentum"] <= 0.95
    b2 = [t["b2"] for t in bench.sample_trials(bench.search_space("adamw"), 8, 0)]
    assert all(0.9 <= v <= 0.999 for v in b2)


def test_warmup_cosine_multiplier_matches_the_schedule():
    steps = np.arange(0, 60)
    expected = optim.schedules.warmup_cosine(1.0, 50, warmup_steps=7)(steps)
    got = jax.jit(lambda t, w: bench.warmup_cosine_multiplier(t, w, 50))(steps, 7.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- shared programs

def test_vmapped_trials_equal_the_same_trials_one_by_one(user_workload, user_optimizer):
    wl = workloads.get("user_lines")
    plan = bench.make_plan("unused", suite=["user_lines"], optimizers=["adamw"], trials=3,
                           studies=2)._replace(step_scale=1.0, evals=4)
    params = {s: jax.device_get(wl.init(jax.random.key(s))) for s in range(2)}
    for name in ("adamw", user_optimizer):
        together = bench.PairRunner(wl, name, plan, params.__getitem__)
        trials = together.trials()
        groups = together.groups(trials)
        if name == "adamw":
            assert len(groups) == 1 and len(groups[0]) == 6   # 3 trials x 2 studies
        vmapped = {}
        for group in groups:
            curves, _, _ = together.run_group(group)
            vmapped.update({(t["study"], t["trial"]): c for t, c in zip(group, curves)})
        alone = bench.PairRunner(wl, name, plan, params.__getitem__)
        alone.vectorized = False
        for trial in trials:
            (curve,), _, _ = alone.run_group([trial])
            np.testing.assert_allclose(np.array(curve), np.array(vmapped[trial["study"],
                                                                         trial["trial"]]),
                                       rtol=1e-5)
        assert len(alone.programs) == len(together.programs)   # hyperparameters are data


def test_a_workload_without_batched_steps_runs_each_trial_step_by_step_alike(user_workload):
    wl = workloads.get("user_lines")
    plan = bench.make_plan("unused", suite=["user_lines"], optimizers=["adamw"], trials=2,
                           studies=1)._replace(step_scale=1.0, evals=4)
    params = {0: jax.device_get(wl.init(jax.random.key(0)))}
    scanned = bench.PairRunner(wl, "adamw", plan, params.__getitem__)
    scanned.vectorized = False
    stepwise = bench.PairRunner(wl._replace(batched_steps=False), "adamw", plan,
                                params.__getitem__)
    assert not stepwise.vectorized
    trials = stepwise.trials()
    assert [len(group) for group in stepwise.groups(trials)] == [1, 1]
    for trial in trials:
        (curve, ), losses, _ = stepwise.run_group([trial])
        (expected, ), expected_losses, _ = scanned.run_group([trial])
        np.testing.assert_allclose(np.array(curve), np.array(expected), rtol=1e-5)
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert len(stepwise.programs) == 1 and not stepwise.programs[((), 1)].scanned
    # the conv net is the built-in without (XLA:CPU compiles its batched steps badly)
    assert not workloads.get("digits_cnn").batched_steps
    assert workloads.get("digits_mlp").batched_steps


def test_kron_trials_run_one_by_one(user_workload):
    # vmapped over trials its batched LAPACK solves can deadlock XLA:CPU's thread pool
    # (optim/builtin_specs.py); its spec says so and the bench asks the spec
    plan = bench.make_plan("unused", suite=["user_lines"], optimizers=["kron"], trials=2,
                           studies=2)
    runner = bench.PairRunner(workloads.get("user_lines"), "kron", plan, None)
    assert not optim.spec("kron").vmappable and not runner.vectorized
    assert [len(group) for group in runner.groups(runner.trials())] == [1] * 4


# ---------------------------------------------------------------------- flags and resume

def test_bad_flag_values_are_usage_errors_naming_them(tmp_path):
    cases = [(dict(workdir=None), "--workdir is required"),
             (dict(preset="huge"), "'huge'"),
             (dict(suite=["digits_mlp", "nope"]), "'nope'"),
             (dict(optimizers=["adamw", "nada"]), "'nada'"),
             (dict(trials=0), "--trials must be an integer >= 1, got 0"),
             (dict(studies=-1), "--studies must be an integer >= 1, got -1"),
             (dict(optimizers=["lion"], baseline="adamw"), "--baseline 'adamw'")]
    for kwargs, message in cases:
        kwargs = {"workdir": str(tmp_path), **kwargs}
        with pytest.raises(cli.UsageError, match=message):
            bench.make_plan(**kwargs)
    plan = bench.make_plan(str(tmp_path), optimizers=["adamw", "kfac"])  # own train step
    assert plan.optimizers == ("adamw",) and "train step" in plan.skipped["kfac"]
    assert plan.baseline == "adamw" and plan.trials == bench.PRESETS["smoke"].trials


def test_user_workload_runs_through_the_bench_and_resumes(tmp_path, user_workload,
                                                          user_optimizer):
    plan = bench.make_plan(str(tmp_path), suite=["user_lines", "noisy_quadratic"],
                           optimizers=["adamw", user_optimizer], trials=2, studies=2)
    results = bench.run_benchmark(plan, log=lambda line: None)
    first = bench.render_report(results)
    assert "user_lines" in first and "refresh_every" in first
    # the tuning budget's curve: every trial's best metric, all 2 x 2 of them
    pair = results["pairs"]["user_lines"]["adamw"]
    bests = [min(m for _, m in t["curve"]) for t in pair["trials"]]
    curve = bench.summarize(results)["tuning_budget"]["user_lines"]["adamw"]
    assert curve["ks"] == [1, 2, 3, 4] and curve["failed"] == 0
    np.testing.assert_allclose(curve["expected"], scoring.expected_best(bests, [1, 2, 3, 4]))
    assert "## Tuning budget" in first
    saved = json.load(open(bench.pair_path(str(tmp_path), "user_lines", user_optimizer)))
    assert all("momentum" in t["hparams"] for t in saved["trials"])
    os.remove(bench.pair_path(str(tmp_path), "user_lines", "adamw"))
    lines = []
    again = bench.render_report(bench.run_benchmark(plan, log=lines.append))
    assert sum("read back" in line for line in lines) == 3
    head = first.index(bench.TIMING_HEADING)
    assert again[:head] == first[:head]
    with pytest.raises(cli.UsageError, match="other settings.*trials"):
        bench.run_benchmark(plan._replace(trials=3), log=lambda line: None)


# In this process (tests/scripts.py's `run_main`, not `python -m ravine.experiments.bench`,
# which costs ~3 s more of CPU starting JAX): the test is about the preset's outputs.
@pytest.mark.slow
def test_smoke_preset_writes_the_report_and_profile(tmp_path, capfd):
    status, out, err = run_main(bench, ["--preset=smoke", f"--workdir={tmp_path}"], capfd)
    assert status == 0, err[-3000:]
    assert "bench: " in out
    report = (tmp_path / bench.REPORT_FILE).read_text()
    for heading in ("## Search spaces", "## Time to target", "## Scores", "## End of training",
                    "## Tuning budget", bench.TIMING_HEADING):
        assert heading in report
    assert (tmp_path / bench.PROFILE_FILE).stat().st_size > 10_000
    assert (tmp_path / bench.BUDGET_FILE).stat().st_size > 10_000
    results = json.loads((tmp_path / bench.RESULTS_FILE).read_text())
    preset = bench.PRESETS["smoke"]
    assert list(results["workloads"]) == list(preset.workloads)
    assert results["optimizers"] == list(preset.optimizers)
    assert "lm_tiny" in results["workloads"] and "GFLOP/s" in report


@pytest.mark.slow
def test_a_bad_flag_exits_2_with_one_line(tmp_path, user_workload, capfd):
    # The user's module is imported by --workload_module (its workload is then known: the
    # fixture's registration is taken away first), then the optimizer is refused. In this
    # process (`run_main`): exit 2 is a SystemExit(2), the line is what reaches stderr.
    workloads.unregister("user_lines")
    try:
        status, _, stderr = run_main(
            bench, [f"--workdir={tmp_path}", f"--workload_module={user_workload}",
                    "--suite=user_lines", "--optimizers=adamw,nope"], capfd)
        assert "user_lines" in workloads.available()
    finally:
        if "user_lines" not in workloads.available():
            user_modules.import_user_module(user_workload)
    assert status == 2
    lines = [line for line in stderr.splitlines() if line.strip()
             and "Warning" not in line and "warn(" not in line]
    assert len(lines) == 1 and "'nope'" in lines[0], stderr
    assert not list(tmp_path.iterdir())   # refused before anything was written
