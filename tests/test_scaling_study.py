"""The scaling study's entry point (`ravine-scaling`, experiments/scaling_study.py): the smoke
presets of isoflop, ffn, critical_batch and lr_batch end to end, in process (one run per
preset, shared by the tests), the isoflop analysis on Chinchilla's loss surface, bad flags,
and a resume after a kill. The fits themselves: tests/test_scaling_fits.py.

Time (2 CPU cores shared with other jobs, load average 5-7, 2026-12-06): 55-67 s (43-48 s of
CPU) with a cold compilation cache, ~45 s (33 s of CPU) with the tests' cache warm. Compiling
dominates: each smoke preset compiles two init programs (params, optimizer states) and one train
program holding all its lanes."""
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ravine.experiments import scaling, scaling_study, workloads
from tests.scripts import json_lines


@pytest.fixture(scope="module")
def isoflop_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("isoflop")
    programs = len(scaling_study._PROGRAMS)
    assert scaling_study.main(["--what=isoflop", "--preset=smoke",
                               f"--workdir={workdir}"]) == 0
    # every size and budget in one train program (and one init program each of the params
    # and the optimizer states): the budgets share it, the cosine's length being data
    assert len(scaling_study._PROGRAMS) - programs == 3
    return workdir


@pytest.mark.slow
def test_isoflop_smoke_reports_the_numbers_of_its_runs(isoflop_dir):
    report = (isoflop_dir / scaling_study.REPORT_FILE).read_text()
    assert (isoflop_dir / "isoflop.png").stat().st_size > 10_000
    preset = scaling_study.PRESETS["isoflop"]["smoke"]
    records = json_lines(isoflop_dir / scaling_study.RUNS_FILE)
    assert len(records) == len(preset.budgets) * len(preset.sizes) * preset.seeds
    cells = {}
    for record in sorted(records, key=lambda r: r["key"]["seed"]):
        cells.setdefault((record["key"]["size"], record["key"]["steps"]), []).append(
            record["result"])
    assert len(cells) == len(preset.budgets) * len(preset.sizes)
    rows = [line for line in report.splitlines() if line.startswith("| ") and " | " in line]
    for (size, steps), results in cells.items():
        losses = [r["final_loss"] for r in results]
        cell = (" ".join(f"{x:.4f}" for x in losses) + f" | {np.mean(losses):.4f} |")
        row = [line for line in rows if f"| {results[0]['tokens']:,} | {steps} |" in line
               and line.split(" | ")[1].rstrip("*") == size]
        assert len(row) == 1 and row[0].endswith(cell), (size, steps, cell, row)
    for row in workloads.ladder_table(preset.sizes):   # both conventions of N, FLOPs/token
        assert (f"| {row['params']:,} | {row['non_embedding_params']:,} | "
                f"{row['flops_per_token']:,} |") in report
    for heading in ("## Approach 2", "## Exponents", "Chinchilla approach 2 (published)",
                    scaling_study.TIMING_HEADING, "GFLOP/s aggregate", "of a float32 1024^2"):
        assert heading in report
    results = json.loads((isoflop_dir / scaling_study.RESULTS_FILE).read_text())
    assert sorted(r["final_loss"] for r in results["runs"]) == sorted(
        r["result"]["final_loss"] for r in records)


def test_isoflop_fits_recover_chinchillas_exponents_from_its_loss_surface(tmp_path):
    # Runs whose losses follow Chinchilla's fitted L(N, D) (Hoffmann et al. 2022, approach 3)
    # at D = C / (6 N), plus seed noise: the study's fits, report and figure, no training.
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    plan = scaling_study.make_plan("isoflop", "smoke", str(tmp_path))
    budgets = (1e18, 2e18, 4e18, 8e18)
    plan = plan._replace(preset=plan.preset._replace(budgets=budgets, window=5,
                                                     surface_starts=4))
    rng = np.random.default_rng(0)
    cells, done = {}, {}
    for c in budgets:
        for i, n in enumerate(np.geomspace(2e7, 2e9, 11)):
            d = c / (6 * n)
            arm = scaling_study.Arm(f"n{i}", 1)
            runs = [scaling_study.Run(arm, 1e-3, seed, round(d), 1, round(d))
                    for seed in range(2)]
            cells[c, f"n{i}"] = runs
            for run in runs:
                loss = E + A / n ** alpha + B / d ** beta + rng.normal(0, 1e-4)
                done[run] = {"params": float(n), "non_embedding_params": 0.9 * n,
                             "flops_per_token": 6.0 * n, "tokens": d, "final_loss": loss,
                             "seconds": 1.0}
    results = scaling_study.isoflop_results(plan, cells, [], {}, done)
    fits = results["fits"]
    optimum = beta / (alpha + beta)   # N_opt ~ C^a of the surface under C = 6 N D
    assert fits["chinchilla"]["a"] == pytest.approx(optimum, abs=0.02)
    assert fits["chinchilla"]["b"] == pytest.approx(1 - optimum, abs=0.02)
    low, high = fits["chinchilla"]["a_interval"]
    assert low <= fits["chinchilla"]["a"] <= high
    assert fits["surface"]["alpha"] == pytest.approx(alpha, abs=0.02)
    assert fits["surface"]["a"] == pytest.approx(optimum, abs=0.01)
    report = "\n".join(scaling_study.render_isoflop(plan, results))
    assert f"| approach 2, N with embeddings | {fits['chinchilla']['a']:.3f} [" in report
    assert f"| {fits['surface']['a']:.3f} | {fits['surface']['b']:.3f} |" in report
    scaling_study.plot_isoflop(plan, results, tmp_path / "isoflop.png")
    assert (tmp_path / "isoflop.png").stat().st_size > 20_000


@pytest.mark.slow
def test_critical_batch_smoke_fits_each_setting_from_its_steps(tmp_path):
    assert scaling_study.main(["--what=critical_batch", "--preset=smoke",
                               f"--workdir={tmp_path}"]) == 0
    report = (tmp_path / scaling_study.REPORT_FILE).read_text()
    assert (tmp_path / "critical_batch.png").stat().st_size > 5_000
    results = json.loads((tmp_path / scaling_study.RESULTS_FILE).read_text())
    preset = scaling_study.PRESETS["critical_batch"]["smoke"]
    assert [(r["axis"], r["size"]) for r in results["rows"]] == (
        [("model", size) for size in preset.sizes]
        + [("data", preset.reference)] * len(preset.data))
    fitted = 0
    for row in results["rows"]:
        assert sorted(int(b) for b in row["steps"]) == list(preset.batch_sizes)
        reached = [b for b in preset.batch_sizes if row["steps"][str(b)] is not None]
        if row["s_min"] is not None:   # the fit is redone on the steps the results hold
            assert scaling.fit_critical_batch(
                reached, [row["steps"][str(b)] for b in reached]) == (row["s_min"],
                                                                      row["b_crit"])
            fitted += 1
    assert fitted >= 1
    for heading in ("## Steps to the target", "## Critical batch size",
                    "## Model size or data size?", scaling_study.TIMING_HEADING):
        assert heading in report


@pytest.mark.slow
def test_lr_batch_smoke_fits_no_law_through_an_optimum_at_the_grids_edge(tmp_path):
    assert scaling_study.main(["--what=lr_batch", "--preset=smoke",
                               f"--workdir={tmp_path}"]) == 0
    report = (tmp_path / scaling_study.REPORT_FILE).read_text()
    assert (tmp_path / "lr_batch.png").stat().st_size > 5_000
    results = json.loads((tmp_path / scaling_study.RESULTS_FILE).read_text())
    preset = scaling_study.PRESETS["lr_batch"]["smoke"]
    ref = str(preset.reference_batch)
    assert [r["size"] for r in results["rows"]] == list(preset.sizes)
    for row in results["rows"]:
        assert (f"| {row['size']} | {row['width']} | {row['params']:,} | "
                + " | ".join(f"{x:.4f}" for x in row["losses"][ref]) + " |") in report
    for name, edges in (("lr", [r["lr_opt"][ref][2] for r in results["rows"]]),
                        ("batch", [r["b_opt"][2] for r in results["rows"]])):
        law = results["laws"][name]
        assert (law["exponent"] is None) == any(edges), name
        if law["exponent"] is None:
            assert f"{'lr_opt' if name == 'lr' else 'B_opt'} ~ N^? (not fitted" in report
    # the transfer: the seed's 1/width rule and muP from the narrowest width's optimum
    w0 = results["rows"][0]["width"]
    for row in results["rows"][1:]:
        assert row["rule"]["lr"] == pytest.approx(results["base_lr"] * w0 / row["width"])
        assert row["mup"]["lr"] == pytest.approx(results["base_lr"])


@pytest.mark.slow
def test_ffn_smoke_writes_the_table_of_the_eight_variants(tmp_path):
    assert scaling_study.main(["--what=ffn", "--preset=smoke", f"--workdir={tmp_path}"]) == 0
    report = (tmp_path / scaling_study.REPORT_FILE).read_text()
    assert (tmp_path / "ffn.png").stat().st_size > 5_000
    by_variant = {}
    for record in sorted(json_lines(tmp_path / scaling_study.RUNS_FILE),
                         key=lambda r: r["key"]["seed"]):
        by_variant.setdefault(record["key"]["mlp"], []).append(record["result"])
    assert sorted(by_variant) == sorted(scaling_study.FFN_NAMES)
    params = set()
    for variant, name in scaling_study.FFN_NAMES.items():
        (row,) = [line for line in report.splitlines() if line.startswith(f"| {name} |")]
        losses = [r["final_loss"] for r in by_variant[variant]]
        assert len(losses) == scaling_study.PRESETS["ffn"]["smoke"].seeds >= 3
        assert f"| {np.mean(losses):.4f} +/- " in row
        assert " ".join(f"{x:.4f}" for x in losses) in row
        assert f"| {scaling_study.SHAZEER_65K[variant]:.3f} |" in row
        params.add(by_variant[variant][0]["params"])
    assert len(params) == 1   # gated d_ff = 2/3 of 4 d_model: equal params exactly


@pytest.mark.parametrize("args, message", [
    (["--what=nope"], "'nope'"),
    (["--what=isoflop", "--preset=huge"], "'huge'"),
    (["--what=ffn", "--seeds=0"], "--seeds must be an integer >= 1, got 0"),
    (["--what=ffn", "--optimizer=nada"], "'nada'"),
    (["--what=ffn", "--optimizer=schedule_free_adamw"], "constant learning rate"),
    (["--what=ffn", "--seeds=two"], "'two'"),
    (["--what=ffn", "--bogus=1"], "bogus"),
    (["--preset=smoke"], "--what is required"),
    (["--what=ffn", "--preset=smoke", None], "--workdir is required"),
])
def test_a_bad_flag_exits_2_with_one_line(tmp_path, capsys, args, message):
    args = args[:-1] if args[-1] is None else [*args, f"--workdir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        scaling_study.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())   # nothing written


@pytest.mark.slow
def test_a_rerun_after_a_kill_reuses_the_finished_runs(isoflop_dir, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(isoflop_dir, workdir)
    lines = (workdir / scaling_study.RUNS_FILE).read_text().splitlines(keepends=True)
    # the runs of one job (the smaller budget, the shorter job) are lost, and a kill while
    # writing left half a line at the end
    kept = [line for line in lines if _budget_index(json.loads(line), lines) == 1]
    dropped = len(lines) - len(kept)
    (workdir / scaling_study.RUNS_FILE).write_text("".join(kept) + lines[0][:40])
    assert dropped and kept
    assert scaling_study.main(["--what=isoflop", "--preset=smoke",
                               f"--workdir={workdir}"]) == 0
    report = (workdir / scaling_study.REPORT_FILE).read_text()
    original = (isoflop_dir / scaling_study.REPORT_FILE).read_text()
    head = original.index(scaling_study.TIMING_HEADING)
    assert report[:head] == original[:head]   # the same numbers (the same programs)
    assert f"trained {dropped} run(s) and read {len(kept)} back" in report
    store = scaling_study.Store(str(workdir))
    assert store.damaged == 1 and len(store.results) == len(lines)


def _budget_index(record, lines):
    """0 for a run of the smallest budget (its size's fewest steps), else 1."""
    size = record["key"]["size"]
    fewest = min(json.loads(line)["key"]["steps"] for line in lines
                 if json.loads(line)["key"]["size"] == size)
    return int(record["key"]["steps"] > fewest)


def test_the_console_script_is_registered():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["ravine-scaling"] == \
        "ravine.experiments.scaling_study:main"
