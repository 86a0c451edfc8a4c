"""experiments.race: the learning-rate grid, picking the best run, and the script end to end."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import race, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
WORDS = "a race of seven optimizers over the lazy dog and a quick brown fox".split()


def test_lr_grid_is_a_log_grid_centred_on_the_optimizer():
    grid = race.lr_grid("lion", 3, 10.0)
    np.testing.assert_allclose(grid, [race.CENTRE_LR["lion"] * f for f in (0.1, 1, 10)])
    grid = race.lr_grid("adamw", 4, 2.0)
    np.testing.assert_allclose(np.diff(np.log(grid)), np.log(2.0))
    np.testing.assert_allclose(math.prod(grid) ** 0.25, race.CENTRE_LR["adamw"])
    assert race.lr_grid("adamw", 3, 2.0, explicit=[0.3, 0.1]) == [0.1, 0.3]


def test_best_run_is_the_lowest_finite_final_eval_loss_and_edges_are_flagged():
    runs = [{"lr": 1e-3, "final_eval_loss": 2.0}, {"lr": 3e-3, "final_eval_loss": 1.5},
            {"lr": 1e-2, "final_eval_loss": math.nan}]
    best = race.best_of(runs)
    assert best["lr"] == 3e-3 and not best["at_edge"]
    runs[2]["final_eval_loss"] = 1.0
    assert race.best_of(runs)["lr"] == 1e-2 and race.best_of(runs)["at_edge"]
    assert race.steps_to([(10, 3.0), (20, 1.9), (30, 1.2)], 2.0) == 20
    assert race.steps_to([(10, 3.0)], 2.0) is None


def test_run_config_resets_the_other_hyperparameters_and_sets_evals():
    from experiments.configs import lm
    base = lm.get_config("124m")  # sets b2 and weight_decay for AdamW
    config = race.run_config(base, "lion", 1e-4, 3e-3, evals=10)
    assert config.optimizer.name == "lion" and config.optimizer.learning_rate == 1e-4
    assert config.optimizer.b2 is None and config.optimizer.weight_decay is None
    assert config.eval_every == base.steps // 10
    muon = race.run_config(base, "muon", 0.02, 3e-3)
    assert muon.optimizer.adam_learning_rate == 3e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(16):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=400)) + "\n")
    return str(folder)


def race_command(corpus, *flags):
    return [sys.executable, "-m", "experiments.race",
            f"--config={ROOT}/experiments/configs/lm.py:tiny", f"--config.corpus={corpus}",
            "--config.steps=12", "--config.batch_size=8", "--config.seq_len=32",
            "--config.model.n_layers=1", "--config.log_every=2",
            "--config.schedule.warmup_steps=2", *flags]


def table_rows(report):
    """{optimizer: [cells]} of the report's first table."""
    table = report.split("## Every run")[0]
    return {cells[0]: cells for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| optimizer"))}


@pytest.mark.slow
def test_race_reports_each_optimizer_at_its_best_lr(corpus, tmp_path):
    # A relative --workdir, as `make demo` passes it.
    command = race_command(corpus, "--workdir=race", "--optimizers=adamw,lion",
                           "--lrs=1e-3,1e-2", "--evals=3")
    done = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = tmp_path / "race"
    assert "report in" in done.stdout
    assert os.path.getsize(workdir / race.CURVES_FILE) > 1000
    rows = table_rows((workdir / race.REPORT_FILE).read_text())
    assert set(rows) == {"adamw", "lion"}

    # The oracle: every run's own metrics.jsonl.
    final, curves = {}, {}
    for name in ("adamw", "lion"):
        for lr in (1e-3, 1e-2):
            run_dir = workdir / "runs" / f"{name}_lr{lr:.3g}"
            log = train.MetricsLog(str(run_dir / train.METRICS_FILE)).rows()
            evals = [(row["step"], row["eval_loss"]) for row in log if "eval_loss" in row]
            assert [step for step, _ in evals] == [4, 8, 12]
            final[name, lr], curves[name, lr] = evals[-1][1], evals
            assert (run_dir / train.CHECKPOINT_DIR / "12").is_dir()
    target = min(final["adamw", lr] for lr in (1e-3, 1e-2))
    for name in ("adamw", "lion"):
        best_lr = min((1e-3, 1e-2), key=lambda lr: final[name, lr])
        cells = rows[name]
        assert float(cells[1].rstrip("*")) == pytest.approx(best_lr)
        assert cells[1].endswith("*")  # two points: the best is always at an edge
        assert float(cells[2]) == pytest.approx(final[name, best_lr], abs=1e-4)
        reached = race.steps_to(curves[name, best_lr], target)
        assert cells[3] == ("-" if reached is None else str(reached))
    assert rows["adamw"][3] != "-"  # AdamW's best run reaches its own final loss

    # Run again: the finished runs are read back, not trained again, and the report holds.
    again = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert table_rows((workdir / race.REPORT_FILE).read_text()).keys() == rows.keys()
    assert [c[:4] for c in table_rows((workdir / race.REPORT_FILE).read_text()).values()] == \
        [c[:4] for c in rows.values()]


@pytest.mark.parametrize("flags, needle", [
    (["--optimizers=adamw,adamax"], "adamax"),
    (["--lrs=1e-3,-2"], "-2"),
    (["--lr_points=0"], "--lr_points"),
    (["--config.optimizer.name=lion", "--config.mesh=data=3"], "data=3"),
    (["--optimizers=adamw,muon", "--muon_adam_lr=-1"], "--muon_adam_lr"),
])
def test_bad_flags_exit_2_with_one_line(corpus, tmp_path, flags, needle):
    done = subprocess.run(race_command(corpus, f"--workdir={tmp_path}/race", *flags),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert not os.path.exists(tmp_path / "race")
    assert re.match(r"^error: ", lines[0])
