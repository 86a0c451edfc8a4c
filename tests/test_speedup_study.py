"""The speedup-against-model-size study (`ravine-scaling --what=speedup`, issue 29 item 4) and
its place in `ravine-bench --preset=scale`: the smoke preset end to end (one run, in process,
shared by the tests), the speedups and their slope on a baseline curve whose answer is known
in closed form, a resume that trains only the lost runs, and bad flags.

The smoke preset trains 32 runs of 1 to 8 steps (AdamW at 1x, 2x, 4x and Muon at 1x on the 4
width rungs, 2 seeds); compiling is most of its time: one params init of the 4 widths, and per
optimizer its states' init and one train program for all its lanes. Time (2 CPU cores shared
with other jobs, load average 4.4, cold compilation cache, 2026-12-06): 49 s (32 s of CPU)."""
import json
import math
import re
import shutil

import numpy as np
import pytest

from ravine.experiments import bench, scaling_study, workloads
from ravine.experiments.runtime import cli
from tests.scripts import json_lines

SMOKE = scaling_study.PRESETS["speedup"]["smoke"]


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("speedup")
    assert scaling_study.main(["--what=speedup", "--preset=smoke",
                               f"--workdir={workdir}"]) == 0
    return workdir


# ------------------------------------------------------------------------ the smoke preset

def test_smoke_preset_writes_the_speedups_their_slope_and_the_figure(smoke_dir):
    report = (smoke_dir / scaling_study.REPORT_FILE).read_text()
    results = json.loads((smoke_dir / scaling_study.RESULTS_FILE).read_text())
    assert (smoke_dir / "speedup_vs_size.png").stat().st_size > 10_000
    base, (other,) = results["baseline"], results["compared"]
    assert (base, other) == SMOKE.optimizers
    fit = results["speedups"][other]
    for size in SMOKE.sizes:
        speedup, (low, high) = fit["speedups"][size], fit["intervals"][size]
        assert math.isfinite(speedup) and speedup > 0 and low <= high
    assert math.isfinite(fit["slope"])
    assert fit["slope_interval"][0] <= fit["slope"] <= fit["slope_interval"][1]
    # the slope is the fit of log speedup against log non-embedding params
    params = [row["non_embedding_params"] for row in results["sizes"]]
    speedups = [fit["speedups"][row["size"]] for row in results["sizes"]]
    assert fit["slope"] == pytest.approx(np.polyfit(np.log(params), np.log(speedups), 1)[0])
    assert params[-1] / params[0] >= 8
    # every run: the baseline at each multiple and the other at 1x, every seed; the grid's
    # runs are the narrowest size's 1x runs, the re-tune's (x1, seed 0) the widest size's
    records = json_lines(smoke_dir / scaling_study.RUNS_FILE)
    assert SMOKE.lr_factors == SMOKE.retune_factors == (1.0,)
    expected = SMOKE.seeds * len(SMOKE.sizes) * (len(SMOKE.multiples) + 1)
    assert len(records) == results["n_runs"] == expected
    assert {r["key"]["parametrization"] for r in records} == {"mup"}
    assert {r["key"]["base_width"] for r in records} == {16}
    assert {r["key"].get("mup_table") for r in records} == {None, "muon"}
    flops = sum(r["result"]["flops_per_token"] * r["result"]["tokens"] for r in records)
    assert results["flops"]["total"] == pytest.approx(flops)
    assert f"{flops:.3g} = the lr grid" in report
    for row in results["sizes"]:   # the speedup table's cells are the results' numbers
        cell = (f"| {row['size']} | {row['non_embedding_params']:,} | "
                f"{fit['speedups'][row['size']]:.3f} [")
        assert cell in report
    assert f"| slope | | {fit['slope']:.3f} [" in report
    for heading in ("## Sizes", "## Learning rates", "## Final losses", f"## Speedup over {base}",
                    "## Re-tune at `wide`", "## Compute", scaling_study.TIMING_HEADING,
                    "GFLOP/s aggregate"):
        assert heading in report
    assert set(results["retune"]) == set(SMOKE.optimizers)
    for o, check in results["retune"].items():
        assert check["factors"] == [1.0] and check["lrs"] == [results["tuning"][o]["best_lr"]]
        assert check["losses"] == results["losses"][o]["wide"]["1"][:1]


def test_default_preset_states_its_training_flops():
    plan = scaling_study.make_plan("speedup", "default", "unused")
    flops = scaling_study.speedup_flops(plan)
    stated = float(re.search(r"([0-9.]+e[0-9]+) training FLOPs", plan.preset.about).group(1))
    assert stated == pytest.approx(flops["total"], rel=0.01)
    # within 60 min on 2 cores at the 12-21 GFLOP per CPU second measured for its medium and
    # wide rungs (the module docstring)
    assert flops["total"] / 12e9 < 3600
    assert plan.optimizers == ("adamw", "muon", "soap") and plan.seeds == 2
    assert plan.preset.tokens_per_param == workloads.TOKENS_PER_PARAM
    assert plan.preset.multiples == (1, 2, 4)


# ----------------------------------------------------------- speedups on a known curve

def _power_law_study(seeds, noise, slope=-0.1):
    """A baseline with L(D) = E + B D^-beta per size, exactly (times a per-seed factor
    1 + noise_s), and an optimizer whose 1x loss is the baseline's at s(N) x its tokens,
    s(N) = 2 N^slope / N0^slope: its speedup is s(N) in closed form."""
    E, B, beta = 1.5, 40.0, 0.3
    params = {"a": 1e4, "b": 3e4, "c": 1e5, "d": 3e5}
    rng = np.random.default_rng(0)
    wiggle = 1 + noise * rng.standard_normal((len(seeds), 4))
    tokens = {size: 20 * n for size, n in params.items()}
    truth = {size: 2.0 * (n / 1e4) ** slope for size, n in params.items()}

    def loss(d, seed, k):
        return (E + B * d ** -beta) * wiggle[seed, k]

    base_tokens = {size: [k * tokens[size] for k in (1, 2, 4)] for size in params}
    base_losses = {size: [[loss(d, s, 0) for s in seeds] for d in base_tokens[size]]
                   for size in params}
    losses = {"opt": {size: [loss(truth[size] * tokens[size], s, 1) for s in seeds]
                      for size in params}}
    return params, base_tokens, base_losses, {"opt": tokens}, losses, truth


def test_speedups_and_slope_match_a_closed_form_power_law():
    seeds = [0, 1]
    params, base_tokens, base_losses, tokens, losses, truth = _power_law_study(seeds, 0.0)
    (fit,) = scaling_study.speedup_fits(params, base_tokens, base_losses, tokens, losses,
                                        seeds, resamples=50).values()
    for size, expected in truth.items():
        assert fit["speedups"][size] == pytest.approx(expected, rel=1e-3)
        assert fit["intervals"][size] == pytest.approx([expected, expected], rel=1e-3)
    assert fit["slope"] == pytest.approx(-0.1, abs=1e-3)
    assert fit["coefficient"] == pytest.approx(2.0 / 1e4 ** -0.1, rel=1e-2)
    assert fit["slope_interval"] == pytest.approx([-0.1, -0.1], abs=1e-3)
    assert fit["dropped"] == 0


def test_bootstrap_interval_over_seeds_contains_the_estimate():
    seeds = [0, 1, 2]   # 10 multisets of 3 seeds: 10 fits per optimizer and size
    study = _power_law_study(seeds, 0.002)
    (fit,) = scaling_study.speedup_fits(*study[:5], seeds, resamples=300).values()
    low, high = fit["slope_interval"]
    assert low < fit["slope"] < high and high - low < 0.2
    assert fit["slope"] == pytest.approx(-0.1, abs=0.05)
    for size, (low, high) in fit["intervals"].items():
        assert low <= fit["speedups"][size] <= high
    # a diverged seed leaves no finite speedup at its size in the draws that take it, and no
    # point estimate
    study[4]["opt"]["c"][2] = None
    (fit,) = scaling_study.speedup_fits(*study[:5], seeds, resamples=300).values()
    assert fit["speedups"]["c"] is None and fit["slope"] is None
    assert 0 < fit["dropped"] < 300


# --------------------------------------------------------------------------- resume

def test_a_rerun_trains_only_the_lost_runs(smoke_dir, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(smoke_dir, workdir)
    lines = (workdir / scaling_study.RUNS_FILE).read_text().splitlines(keepends=True)
    # Muon's job is lost (its 1x runs at every size), and a kill while writing left half a
    # line
    lost = [line for line in lines if json.loads(line)["key"]["optimizer"] == "muon"]
    kept = [line for line in lines if line not in lost]
    assert len(lost) == SMOKE.seeds * len(SMOKE.sizes)
    (workdir / scaling_study.RUNS_FILE).write_text("".join(kept) + lines[0][:50])
    plan = scaling_study.make_plan("speedup", "smoke", str(workdir))
    log = []
    programs = len(scaling_study._PROGRAMS)
    _, report = scaling_study.run_study(plan, log=log.append)
    jobs = [line for line in log if line.startswith("scaling: ") and "call(s)" in line]
    assert len(jobs) == 1 and jobs[0].startswith("scaling: small ")
    assert len(scaling_study._PROGRAMS) == programs   # the same programs, not recompiled
    assert f"trained {len(lost)} run(s) and read {len(kept)} back" in report
    original = (smoke_dir / scaling_study.REPORT_FILE).read_text()
    head = original.index(scaling_study.TIMING_HEADING)
    assert report[:head] == original[:head]
    store = scaling_study.Store(str(workdir))
    assert store.damaged == 1 and len(store.results) == len(lines)


# ---------------------------------------------------------------------------- flags

@pytest.mark.parametrize("args, message", [
    (["--optimizers=adamw,nope"], "'nope'"),
    (["--optimizers=muon,soap"], "the baseline --optimizer 'adamw' is not among"),
    (["--optimizers=adamw,muon,adamw"], "names an optimizer twice"),
    (["--optimizers=adamw"], "at least one optimizer"),
    (["--optimizers=adamw,schedule_free_adamw"], "constant learning rate"),
    (["--optimizer=lion"], "'lion'"),
    (["--what=ffn", "--optimizers=adamw,muon"], "--optimizers is for --what=speedup"),
])
def test_a_bad_flag_exits_2_with_one_line(tmp_path, capsys, args, message):
    argv = ["--what=speedup", "--preset=smoke", *args, f"--workdir={tmp_path}"]
    if any(a.startswith("--what=ffn") for a in args):
        argv.remove("--what=speedup")
    with pytest.raises(SystemExit) as exit_info:
        scaling_study.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("sizes", [("small", "compact", "medium"),        # 3 sizes
                                   ("tiny", "small", "compact", "medium"),  # two depths
                                   ("small", "compact", "medium", "medium"),
                                   ("small", "compact", "medium", "huge")])
def test_a_preset_without_four_width_rungs_spanning_8x_is_refused(monkeypatch, sizes):
    monkeypatch.setitem(scaling_study.PRESETS["speedup"], "bad", SMOKE._replace(sizes=sizes))
    named = "'huge'" if "huge" in sizes else ",".join(sizes)
    with pytest.raises(cli.UsageError, match=re.escape(named)):
        scaling_study.make_plan("speedup", "bad", "unused")


# ------------------------------------------------------------------------ the benchmark

def test_bench_scale_preset_reports_the_speedup_study(smoke_dir, tmp_path, monkeypatch):
    # The scale preset with a one-workload suite and the speedup study's smoke preset, whose
    # runs are already in DIR/speedup/runs.jsonl: nothing of the study trains again.
    monkeypatch.setitem(bench.PRESETS, "scale", bench.PRESETS["scale"]._replace(
        workloads=("noisy_quadratic",), optimizers=SMOKE.optimizers, trials=1, studies=1,
        evals=2, step_scale=0.05, speedup="smoke"))
    (tmp_path / bench.SPEEDUP_DIR).mkdir()
    shutil.copy(smoke_dir / scaling_study.RUNS_FILE, tmp_path / bench.SPEEDUP_DIR)
    plan = bench.make_plan(str(tmp_path), preset="scale")
    assert plan.speedup.optimizers == SMOKE.optimizers and plan.speedup.optimizer == "adamw"
    log = []
    text = bench.write_outputs(str(tmp_path), bench.run_benchmark(plan, log=log.append))
    assert not [line for line in log if line.startswith("scaling: ")]   # all read back
    study = (smoke_dir / scaling_study.REPORT_FILE).read_text()
    section = study[study.index("## Speedup over"):study.index("## Re-tune")]
    assert "#" + section in text                    # its table, one heading level down
    assert text.index("## Speedup against model size") < text.index(bench.TIMING_HEADING)
    assert (tmp_path / bench.SPEEDUP_FILE).stat().st_size > 10_000
    assert (tmp_path / bench.SPEEDUP_DIR / scaling_study.REPORT_FILE).exists()
    saved = json.loads((tmp_path / bench.RESULTS_FILE).read_text())
    assert saved["speedup"]["speedups"] == json.loads(
        (smoke_dir / scaling_study.RESULTS_FILE).read_text())["speedups"]
    # an optimizer the bench runs but the study cannot (its own constant lr) is refused
    with pytest.raises(cli.UsageError, match="'schedule_free_adamw' cannot run in the scaling"):
        bench.make_plan(str(tmp_path), preset="scale",
                        optimizers=["adamw", "schedule_free_adamw"])
