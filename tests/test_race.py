"""experiments.race: statistics, grids, the report, and the script end to end."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ravine import optim
from ravine.experiments import race, race_stats

from ravine.experiments.runtime import sweep
from tests.scripts import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PYTHONPATH: this checkout's packages, also from a subprocess started in another folder.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8", "PYTHONPATH": ROOT}
WORDS = "a race of seven optimizers over the lazy dog and a quick brown fox".split()


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("dof, quantile", [  # two-sided 95% column of a printed t table
    (1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantile_matches_the_table(dof, quantile):
    assert race_stats.t_quantile(0.975, dof) == pytest.approx(quantile, abs=6e-4)


def test_mean_ci_by_hand():
    # mean 2.3; s^2 = (0.09 + 0.01 + 0.01 + 0.09) / 3; half = t(0.975, 3) * s / sqrt(4).
    mean, half, n = race_stats.mean_ci([2.0, 2.2, 2.4, 2.6, math.nan, None])
    assert n == 4 and mean == pytest.approx(2.3)
    assert half == pytest.approx(3.182446 * math.sqrt(0.2 / 3) / 2, rel=1e-5)
    assert math.isnan(race_stats.mean_ci([1.5])[1]) and race_stats.mean_ci([])[2] == 0


def test_paired_p_value_closed_forms():
    # n = 3 (2 dof): t = sqrt(7) for differences 1, 2, 4, and 2-sided p = 1 - t/sqrt(2+t^2).
    p = race_stats.paired_p_value([3.0, 4.0, 7.0, math.nan], [2.0, 2.0, 3.0, 1.0])
    assert p == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-6)
    # n = 2 (1 dof, Cauchy): differences 1, 3 -> t = 2 / (sqrt(2) / sqrt(2)) = 2.
    assert race_stats.paired_p_value([1.0, 3.0], [0.0, 0.0]) == pytest.approx(
        1 - 2 / math.pi * math.atan(2.0), rel=1e-6)
    assert math.isnan(race_stats.paired_p_value([1.0], [2.0]))


def test_steps_to_target_interpolates_and_censors():
    curve = [(0, 5.0), (10, 3.0), (20, 1.0)]
    assert race_stats.steps_to_target(curve, 2.0) == pytest.approx(15.0)
    assert race_stats.steps_to_target(curve, 3.0) == pytest.approx(10.0)
    assert race_stats.steps_to_target(curve, 0.5) is None
    assert race_stats.censored([10.0, None, 20.0, 30.0]) == (3, 4, 20.0)
    assert race_stats.censored([None, None])[:2] == (0, 2)


# ----------------------------------------------------------------------------- grids


def u_curve(optimum):
    """A synthetic U-curve in log lr (no training): losses_at(lrs) and the lrs it saw."""
    seen = []

    def losses_at(lrs):
        seen.append(list(lrs))
        return {lr: (math.log(lr / optimum)) ** 2 for lr in lrs}

    return losses_at, seen


def test_grid_extends_past_the_edge_until_the_minimum_is_inside():
    grid = race.lr_grid("adamw", 5, 2.0)  # 7.5e-4 .. 1.2e-2
    losses_at, seen = u_curve(optimum=0.05)  # beyond the top edge
    final, losses, added = race_stats.settle_grid(grid, losses_at, 2.0, max_points=9)
    np.testing.assert_allclose(added, [0.024, 0.048, 0.096])
    best = min(final, key=losses.get)
    assert best == pytest.approx(0.048) and final[0] < best < final[-1]
    assert len(seen) == 4 and seen[-1] == final

    losses_at, _ = u_curve(optimum=1e-5)  # far below: stops at max_points, best at an edge
    final, losses, added = race_stats.settle_grid(grid, losses_at, 2.0, max_points=7)
    np.testing.assert_allclose(added, [3.75e-4, 1.875e-4])
    assert min(final, key=losses.get) == final[0]


def test_divergence_extends_a_grid_only_downward():
    grid = [1e-3, 2e-3, 4e-3]
    # Everything diverged: go down.
    assert race_stats.next_lr(grid, dict.fromkeys(grid, math.inf), 2.0, 9) == 5e-4
    # The top diverged and the best is in the middle: settled.
    losses = {1e-3: 2.0, 2e-3: 1.5, 4e-3: math.nan}
    assert race_stats.next_lr(grid, losses, 2.0, 9) is None
    # Best at the bottom with the top diverged: down.
    assert race_stats.next_lr(grid, {1e-3: 1.0, 2e-3: 1.5, 4e-3: math.inf}, 2.0, 9) == 5e-4
    assert race_stats.next_lr(grid, {1e-3: 3.0, 2e-3: 2.0, 4e-3: 1.0}, 2.0, 3) is None


def test_lr_grid_and_run_config():
    grid = race.lr_grid("lion", 5, 2.0)
    np.testing.assert_allclose(grid, [1e-3 * 2.0 ** k for k in range(-2, 3)])
    assert optim.spec("lion").centre_lr == 1e-3
    assert race.lr_grid("adamw", 3, 2.0, explicit=[0.3, 0.1]) == [0.1, 0.3]
    from ravine.experiments.configs import lm
    base = lm.get_config("124m")  # sets b2 and weight_decay for AdamW
    config = race.run_config(base, "lion", 1e-4, evals=20)
    assert config.optimizer.name == "lion" and config.optimizer.b2 is None
    assert config.eval_every == base.steps // 20 and config.schedule.peak_value is None
    # Muon's spec fixes its AdamW leaves' peak lr; --hparams overrides it
    assert race.run_config(base, "muon", 0.02).optimizer.adam_learning_rate == 3e-3
    hparams = race.race_hparams(["adamw", "muon"], ["muon.adam_learning_rate=0.01"])
    assert hparams == {"adamw": {}, "muon": {"adam_learning_rate": 0.01}}
    assert race.run_config(base, "muon", 0.02, hparams["muon"]).optimizer.adam_learning_rate \
        == 0.01
    for bad, needle in (["muon.adam_learning_rate"], "OPTIMIZER.HPARAM=VALUE"), (
            ["lion.b1=0.9"], "'lion', which is not in --optimizers"):
        with pytest.raises(ValueError, match=re.escape(needle)):
            race.race_hparams(["adamw", "muon"], bad)
    with pytest.raises(ValueError, match="optimizer 'adamw' takes no 'not_a_knob'"):
        race.run_config(base, "adamw", 1e-3, {"not_a_knob": 0.9})


def test_every_available_optimizer_can_be_raced():
    import jax
    import jax.numpy as jnp
    from ravine import optim
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    for name in optim.available():
        config = tiny_config(name, optim.spec(name).centre_lr, 0)
        tx, schedule = sweep.optimizer_at(config, jnp.float32(0.5))
        # init and update in one jitted program, as the race runs them (jitted): one
        # compilation per optimizer, not one more for each op of an eager init
        updates = jax.jit(lambda p, tx=tx: tx.update(p, tx.init(p), p)[0])(params)
        assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates)), name
        if name == "schedule_free_adamw":  # a constant lr, warmed up by the optimizer
            assert float(schedule(10)) == 0.5 and config.optimizer.warmup_steps == 5
            continue
        assert float(schedule(10)) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (
            1 + math.cos(math.pi * 5 / 45))), rel=1e-5), name  # warmup 5, 50 steps
    assert sweep.can_vectorize("adamw") and not sweep.can_vectorize("schedule_free_adamw")


def test_kfac_is_raced_without_clipping_and_checked_up_front(capsys, monkeypatch):
    pytest.importorskip("kfac_jax", reason="kfac-jax is the extra ravine[kfac]")
    from ravine.experiments.configs import lm
    from ravine.experiments.runtime import builders
    monkeypatch.setattr(builders, "_WARNED", set())  # said once per process: say it here
    base = lm.get_config("tiny")
    config = race.run_config(base, "kfac", 3e-3)
    assert config.clip_norm == 0.0 and base.clip_norm == 1.0
    # the spec's `unsupported` says so in one warning line, as the train job does
    assert "optimizer kfac does not support config.clip_norm=1.0; running with 0.0" in \
        capsys.readouterr().err
    sweep.check_config(config)
    config.optimizer.damping = -1.0
    with pytest.raises(ValueError, match="kfac damping must be a positive number, got -1.0"):
        sweep.check_config(config)
    assert race.validate_flags(["adamw", "kfac"])[2:] == ("adamw", {"adamw": {}, "kfac": {}})


def test_summarize_flags_divergence():
    rows = [{"step": 0, "eval_loss": 5.0}, {"step": 5, "loss": 4.0, "skipped_steps": 0},
            {"step": 10, "loss": 3.0, "eval_loss": 3.1, "skipped_steps": 0}]
    record = race.summarize(rows, 10)
    assert record == {"final_eval_loss": 3.1, "curve": [(0, 5.0), (10, 3.1)],
                      "diverged": False}
    assert race.summarize(rows[:2], 10)["diverged"]  # stopped early
    bad = rows[:2] + [{"step": 10, "loss": math.nan, "eval_loss": 3.0}]
    assert race.summarize(bad, 10)["diverged"]
    assert math.isnan(race.summarize(bad, 10)["final_eval_loss"])
    skipped = rows[:2] + [{"step": 10, "loss": 3.0, "eval_loss": 3.0, "skipped_steps": 1}]
    assert race.summarize(skipped, 10)["diverged"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(seeds=0), "--seeds"), (dict(seeds_at_best=0), "--seeds_at_best"),
    (dict(points=1), "--lr_points"), (dict(max_points=3), "--max_lr_points"),
    (dict(runs_per_program=0), "--runs_per_program"), (dict(baseline="lion"), "--baseline"),
    (dict(lrs=["1e-3", "-2"]), "--lrs"), (dict(lrs=["1e-3", "x"]), "--lrs"),
    (dict(evals=0), "--evals"), (dict(spacing=1.0), "--lr_spacing"),
])
def test_validate_flags_names_the_flag(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        race.validate_flags(["adamw", "muon"], **kwargs)
    assert race.validate_flags(["adamw", "muon"], lrs=["1e-3", "2e-3"]) == (
        [1e-3, 2e-3], 6, "adamw", {"adamw": {}, "muon": {"adam_learning_rate": 3e-3}})


# ----------------------------------------------------------------------------- the report


def fake_result(name, losses, steps_to_two, spp=0.01):
    """A race result whose report-seed runs have the given final losses; each eval curve
    goes linearly from 4.0 at step 0 to its final loss at step 100."""
    runs = []
    for loss in losses:
        diverged = not math.isfinite(loss)
        curve = [(0, 4.0), (100, loss)] if not diverged else [(0, 4.0)]
        runs.append({"final_eval_loss": loss, "curve": curve, "diverged": diverged})
    records = {sweep.SweepRun(1e-3, 1 + i): run for i, run in enumerate(runs)}
    return {"optimizer": name, "grid": [5e-4, 1e-3, 2e-3], "added": [], "best_lr": 1e-3,
            "at_edge": False, "selection": {}, "reported": records, "best_runs": runs,
            "seconds_per_step": spp, "state_bytes": 2 ** 20, "params": 1000}


def test_report_columns_against_a_hand_computation():
    from ravine.experiments.configs import lm
    results = [fake_result("adamw", [2.1, 2.1, 2.6, 2.7], None),
               fake_result("lion", [2.0, 2.2, 2.4, 2.6], None),
               fake_result("sgd", [3.0, math.nan, 3.2, 3.4], None)]
    target, source = race.score(results, "adamw")
    assert target == pytest.approx(2.375) and "adamw" in source
    text = race.report(results, target, source, lm.get_config("tiny"), "adamw", 1, 4)
    rows = {cells[0]: cells for cells in
            ([c.strip() for c in line.strip("|").split("|")]
             for line in text.split("## Every run")[0].splitlines()
             if line.startswith("| ") and not line.startswith("| optimizer"))}
    assert list(rows) == ["lion", "adamw", "sgd"]  # ranked by mean
    # lion: mean 2.3, half = t(0.975, 3) s / 2; differences to adamw -0.1, 0.1, -0.2, -0.1:
    # mean -0.075, s = sqrt(0.0475 / 3), t = -0.075 / (s / 2), 3 dof: for 3 dof the
    # two-sided p is 1 - (2 / pi) (x / (1 + x^2) + atan(x)) with x = |t| / sqrt(3).
    half = 3.182446 * math.sqrt(0.2 / 3) / 2
    assert rows["lion"][2] == f"2.3000 ± {half:.4f}" and rows["lion"][3] == "4"
    x = 0.075 / (math.sqrt(0.0475 / 3) / 2) / math.sqrt(3)
    p = 1 - 2 / math.pi * (x / (1 + x * x) + math.atan(x))
    assert rows["lion"][4] == f"{p:.3g}"
    # Steps to target 2.375: each curve crosses it at 100 (4 - 2.375) / (4 - final).
    crossings = sorted(100 * 1.625 / (4 - f) for f in [2.0, 2.2, 2.4, 2.6] if f <= 2.375)
    assert rows["lion"][5] == "2 of 4" and float(rows["lion"][6]) == pytest.approx(
        np.median(crossings), abs=0.5)
    assert float(rows["lion"][8]) == pytest.approx(np.median(crossings) * 0.01, abs=0.01)
    assert rows["adamw"][4] == "-" and rows["adamw"][5] == "2 of 4"  # 2.1 twice reach 2.375
    assert rows["sgd"][3] == "3 (+1 diverged)" and rows["sgd"][5] == "0 of 4"
    assert rows["sgd"][2].startswith("3.2000 ± ")


# ----------------------------------------------------------------------------- sweep == solo


def tiny_config(name, lr, seed, steps=50, **hparams):
    from ravine.experiments.configs import lm
    base = lm.get_config("tiny")
    base.steps, base.batch_size, base.seq_len = steps, 8, 16
    base.model.d_model, base.model.n_layers = 32, 1
    base.log_every, base.eval_batches, base.checkpoint_every = 5, 2, 0
    base.schedule.warmup_steps = 5
    config = race.run_config(base, name, lr, evals=5)
    config.seed = seed
    for key, value in hparams.items():
        config.optimizer[key] = value
    return config


# Shampoo's default eps (1e-6 x the largest eigenvalue) lets the -1/4 root amplify the
# 1e-7 rounding differences of vmapped (batched) matmuls to 3e-4 in the loss by step 35;
# eps 1e-4 keeps its vmapped run within 1e-5. The loop mode is bitwise the solo run even
# at the default. Sophia (its estimate's keys from the run's seed), Schedule-Free (its
# eval at x) and K-FAC (its own step, compiled per run) train in loop mode only.
# Steps: 20 take a run past the 5 warmup steps well into the cosine decay and refresh
# Sophia's Hessian estimate and K-FAC's inverses 6 times; Shampoo (preconditioning from
# step 10, new roots every 10 steps) takes 30, to train on two generations of roots.
# (Compiling the three steps is most of a case's time; each of the 50 steps this took
# cost ~3 x 25 ms, Shampoo's ~3 x 60 ms.)
SWEEP_STEPS = {"shampoo": 30}


@pytest.mark.slow
@pytest.mark.parametrize("name, hparams", [("adamw", {}), ("shampoo", {"eps": 1e-4}),
                                           ("muon", {}), ("sophia", {"hessian_every": 3}),
                                           ("schedule_free_adamw", {}),
                                           ("kfac", {"inverse_update_period": 3}),
                                           ("polyak_sgd", {})])
def test_sweep_runs_equal_solo_train_runs(name, hparams, tmp_path):
    import tests.user_optimizer  # noqa: F401 - registers a user's optimizer with eval_params
    from ravine.experiments.runtime import loop
    lr, steps = optim.spec(name).centre_lr, SWEEP_STEPS.get(name, 20)
    run = sweep.SweepRun(2 * lr, 1)  # trained beside another (lr, seed) under vmap
    engine = sweep.Engine(tiny_config(name, lr, 0, steps, **hparams))
    modes = {"loop": engine.train_group([run], str(tmp_path / "loop"))[run]}
    if sweep.can_vectorize(name):
        modes["vmap"] = engine.train_group([sweep.SweepRun(lr, 0), run],
                                           str(tmp_path / "vmap"), vectorized=True)[run]
    solo_config = tiny_config(name, run.lr, run.seed, steps, **hparams)
    # TensorBoard event files: an output of the train job alone (the rows compared here are
    # its metrics.jsonl); writing them costs ~1 s a run
    solo_config.tensorboard = False
    solo = loop.train(solo_config, str(tmp_path / "solo"), progress=False)["history"]
    solo = {row["step"]: row for row in solo}
    for mode, rows in modes.items():
        assert [row["step"] for row in rows[1:]] == sorted(solo), mode
        for row in rows[1:]:
            expected = solo[row["step"]]
            for key in ("loss", "eval_loss", "lr"):
                if key in expected:
                    np.testing.assert_allclose(row[key], expected[key], rtol=1e-4,
                                               err_msg=f"{mode} {run} {row['step']}")


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(16):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=400)) + "\n")
    return str(folder)


TINY_FLAGS = ["--config.steps=12", "--config.batch_size=8", "--config.seq_len=32",
              "--config.model.n_layers=1", "--config.model.d_model=32",
              "--config.log_every=2", "--config.eval_batches=2",
              "--config.schedule.warmup_steps=2"]


def race_flags(corpus, *flags):
    return [f"--config={ROOT}/experiments/configs/lm.py:tiny", f"--config.corpus={corpus}",
            *TINY_FLAGS, *flags]


def run_race(capfd, *args):
    """`python -m ravine.experiments.race ARGS` in this process (tests/scripts.py's
    `run_main`): `(exit status, stdout, stderr)`. In process, not in a subprocess (3-4 s of
    imports and JAX set-up each, and nothing compiled shared), where a test is about what
    the race computes, writes and says; process behaviour (SIGKILL) keeps its subprocess."""
    return run_main(race, args, capfd)


def table_rows(report):
    """{optimizer: [cells]} of the report's first table."""
    table = report.split("## Every run")[0]
    return {cells[0]: cells for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| optimizer"))}


def read_runs(workdir):
    """{optimizer/run key: rows} of every run's metrics file."""
    out = {}
    for name in sorted(os.listdir(workdir / race.RUNS_DIR)):
        for file in sorted(os.listdir(workdir / race.RUNS_DIR / name)):
            if file.endswith(".jsonl"):
                text = (workdir / race.RUNS_DIR / name / file).read_text()
                out[f"{name}/{file}"] = [json.loads(line) for line in text.splitlines()]
    return out


@pytest.mark.slow
def test_race_end_to_end_and_read_back(corpus, tmp_path, monkeypatch, capfd):
    # A relative --workdir, as `make demo` passes it.
    monkeypatch.chdir(tmp_path)
    command = race_flags(corpus, "--workdir=race", "--optimizers=adamw,lion",
                         "--lrs=2e-3,8e-3", "--max_lr_points=3", "--seeds_at_best=2",
                         "--evals=4")
    status, _, err = run_race(capfd, *command)
    assert status == 0, err[-3000:]
    workdir = tmp_path / "race"
    for file in (race.CURVES_FILE, race.SENSITIVITY_FILE):
        assert os.path.getsize(workdir / file) > 1000
    text = (workdir / race.REPORT_FILE).read_text()
    rows = table_rows(text)
    assert set(rows) == {"adamw", "lion"}
    runs = read_runs(workdir)
    # The oracle: the metrics files. Selection by seed 0, report from seeds 1 and 2.
    for name in ("adamw", "lion"):
        keys = [k for k in runs if k.startswith(name + "/")]
        grid = sorted({float(re.search(r"lr([0-9.e-]+)_", k).group(1)) for k in keys})
        assert 2 <= len(grid) <= 3
        final = {k: runs[k][-1]["eval_loss"] for k in keys}
        assert all([row["step"] for row in runs[k] if "eval_loss" in row] == [0, 3, 6, 9, 12]
                   for k in keys)
        best = min(grid, key=lambda lr: final[f"{name}/lr{lr:.6g}_seed0.jsonl"])
        reported = [final[f"{name}/lr{best:.6g}_seed{s}.jsonl"] for s in (1, 2)]
        assert float(rows[name][1].rstrip("*")) == pytest.approx(best, rel=1e-2)
        assert rows[name][2].startswith(f"{np.mean(reported):.4f} ± ")
        assert rows[name][3] == "2"
    assert rows["adamw"][4] == "-" and 0 <= float(rows["lion"][4]) <= 1
    assert "Grids extended past an edge" in text
    assert not os.listdir(workdir / race.GROUPS_DIR / "adamw")  # no checkpoint left over

    # Run again: every run is read back, nothing is trained, the report is the same.
    status, out, err = run_race(capfd, *command)
    assert status == 0, err[-3000:]
    assert "training" not in out
    assert (workdir / race.REPORT_FILE).read_text() == text
    # Another workload in the same workdir: exit 2 naming the changed field.
    status, _, err = run_race(capfd, *command, "--config.seq_len=16")
    assert status == 2 and "seq_len" in err, err[-2000:]


KILLED_RACE = """
import sys
from tests import fault_train
fault_train.on_save(6, "kill")
from ravine.experiments.runtime import cli
from ravine.experiments import race
cli.run(race.main)
"""


@pytest.mark.slow
def test_race_resumes_after_sigkill_to_the_same_numbers(corpus, tmp_path, monkeypatch,
                                                         capfd):
    flags = ["--optimizers=adamw", "--lrs=2e-3,8e-3", "--max_lr_points=2",
             "--seeds_at_best=1", "--sweep=vmap", "--runs_per_program=2",
             "--config.checkpoint_every=3", "--evals=4"]
    # The SIGKILL needs a process of its own; the resume and the uninterrupted race run
    # in this one (and load its compiled steps from the compilation cache).
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RACE] + race_flags(corpus, "--workdir=killed", *flags),
        cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=900)
    assert killed.returncode == -9, killed.stderr[-3000:]
    groups = tmp_path / "killed" / race.GROUPS_DIR / "adamw"
    assert os.listdir(groups)  # the interrupted group's checkpoint
    assert not os.path.exists(tmp_path / "killed" / race.RUNS_DIR / "adamw")
    monkeypatch.chdir(tmp_path)
    for workdir in ("killed", "whole"):
        status, _, err = run_race(capfd, *race_flags(corpus, f"--workdir={workdir}", *flags))
        assert status == 0, err[-3000:]
    resumed, whole = read_runs(tmp_path / "killed"), read_runs(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and len(whole) == 2 + 2
    assert resumed == whole  # the same numbers, exactly
    killed_rows = table_rows((tmp_path / "killed" / race.REPORT_FILE).read_text())
    whole_rows = table_rows((tmp_path / "whole" / race.REPORT_FILE).read_text())
    assert [row[:7] for row in killed_rows.values()] == [row[:7] for row in whole_rows.values()]


@pytest.mark.parametrize("flags, needle", [
    (["--optimizers=adamw,adamax"], "adamax"),
    (["--seeds=x"], "--seeds"),
    (["--lr_points=1"], "--lr_points"),
    (["--optimizers=adamw", "--baseline=lion"], "--baseline"),
    (["--config.mesh=data=3"], "data=3"),
])
def test_bad_flags_exit_2_with_one_line(corpus, tmp_path, monkeypatch, capfd, flags,
                                        needle):
    monkeypatch.chdir(ROOT)
    status, _, err = run_race(capfd, *race_flags(corpus, f"--workdir={tmp_path}/race", *flags))
    lines = err.strip().splitlines()
    assert status == 2, err[-2000:]
    assert len(lines) == 1 and needle in lines[0], err
    assert not os.path.exists(tmp_path / "race")  # nothing written
    assert re.match(r"^error: ", lines[0])
