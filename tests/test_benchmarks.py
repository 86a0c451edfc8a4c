"""The benchmark scripts run end to end at toy sizes and report what they say they report.

No timing is asserted (times depend on the machine); the tests check that every candidate
gets a row, that state sizes are the true ones and that the ratio columns are ratios.

Every run is a `python -m` process of its own (its exit status, its stdout and stderr, one
CPU device), forked by tests/scripts.py's `Jobs` from one server that imported what the
benchmarks import: a fresh start spends 3-4 s of CPU on imports, more than a bad flag run.
"""
import os
import re

import pytest

from tests.scripts import Jobs

NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
# What the benchmarks import, none of it a module that defines flags (bench_shampoo's and
# race's `--optimizers` would clash in a child that runs the other).
PRELOAD = ["ravine.optim", "ravine.models", "flax.linen", "optax",
           "ravine.experiments.runtime.cli", "ravine.experiments.runtime.train_lib",
           "ravine.experiments.runtime.timing", "ravine.experiments.runtime.loop",
           "ravine.experiments.runtime.sweep", "ravine.experiments.race_stats",
           "ravine.experiments.configs.lm", "matplotlib.pyplot"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    # As before, when each run was `subprocess.run`: JAX on the CPU, one device (the
    # worker's 8 emulated devices are a config update, not this environment).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    server = Jobs(str(tmp_path_factory.mktemp("bench_jobs")), env, PRELOAD)
    try:
        # What the preloaded imports print would lead each process's stderr.
        assert server.import_noise() == ""
        yield server
    finally:
        server.close()


def run_script(jobs, module, *flags):
    return jobs.run([f"ravine.experiments.benchmarks.{module}", *flags], timeout=600)


def table_rows(stdout, names):
    """name -> the numbers on its table row (a line starting with the name and a number)."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in names and len(parts) > 1 and re.fullmatch(NUMBER, parts[1]):
            rows[parts[0]] = [float(p) for p in parts[1:] if re.fullmatch(NUMBER, p)]
    return rows


def printed_ratio_is(ratio, a, b, digit, ratio_digit):
    """Whether a printed `ratio` is a / b, given a and b printed to `digit` and the ratio to
    `ratio_digit`: within the interval their rounding allows."""
    half, half_ratio = digit / 2, ratio_digit / 2
    low = (a - half) / (b + half)
    high = (a + half) / max(b - half, 1e-12)
    return low - half_ratio <= ratio <= high + half_ratio


# Smaller than the smoke-test command in experiments/benchmarks/bench_shampoo.py's docstring
# (no reference), for compile time, which is nearly all of the run: it grows with the leaves
# and with the distinct block shapes (eigh is unrolled per block on the CPU, and Newton
# compiles a loop per block shape). The pytree: --n_layers=0, the embedding, final norm and
# head (matrices and a vector, the kinds every candidate treats apart), 256 x 256 matrices
# in one block shape; 0.13M params, more than the docstring's 0.11M, so the state sizes,
# printed to 0.1 MiB, are checked as closely (AdamW's 1.0 MiB). The LM: the narrowest (width
# 16, one transformer block), all of whose leaves fit one Shampoo block, so its two Shampoo
# train steps compile the fewest block shapes. One untimed warm-up call instead of two.
SHAMPOO_SMOKE = ["--d_model=256", "--vocab_size=256", "--n_layers=0", "--block_size=256",
                 "--precondition_every=2", "--steps_per_call=2", "--reps=1", "--calls=1",
                 "--warmup=1", "--reference_dir=", "--train_step", "--lm_d_model=16",
                 "--lm_layers=1", "--lm_seq_len=16", "--lm_batch=2",
                 "--lm_shampoo=shampoo_eigh,shampoo_newton_bf16x6"]


@pytest.mark.slow
def test_bench_shampoo_reports_every_candidate_and_the_true_state_sizes(jobs):
    done = run_script(jobs, "bench_shampoo", *SHAMPOO_SMOKE)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    n_params = float(re.search(rf"params: ({NUMBER})M float32", out).group(1)) * 1e6
    names = ["shampoo_eigh", "shampoo_newton", "adamw", "adamw_optax", "muon", "muon_optax"]
    rows = table_rows(out, names)
    assert sorted(rows) == sorted(names), out
    base = rows["adamw_optax"][0]
    for name, (ms, mib, x_adamw) in rows.items():
        assert ms > 0 and mib > 0
        assert printed_ratio_is(x_adamw, ms, base, 0.01, 0.01), (name, rows)
    # AdamW keeps two float32 moments per parameter; ours and optax's alike.
    for name in ("adamw", "adamw_optax"):
        assert rows[name][1] == pytest.approx(2 * 4 * n_params / 2**20, rel=0.01, abs=0.06)
    # Shampoo (momentum, Adam-grafting moment, statistics and roots) keeps more than AdamW.
    assert rows["shampoo_eigh"][1] == rows["shampoo_newton"][1] > rows["adamw"][1]
    assert "reference (precondition-opt==0.3.0): skipped" in out
    breakdown = re.search(rf"shampoo_eigh breakdown .*: statistics ({NUMBER}) .*roots "
                          rf"({NUMBER}) .*rest ({NUMBER})", out)
    assert breakdown, out
    for name in ("shampoo_eigh", "shampoo_newton_bf16x6"):
        ratio = re.search(rf"{name}: ({NUMBER}) ms, adamw ({NUMBER}) ms, ratio ({NUMBER})", out)
        assert ratio, out
        shampoo_ms, adamw_ms, printed = map(float, ratio.groups())
        assert printed_ratio_is(printed, shampoo_ms, adamw_ms, 0.1, 0.001), ratio.group(0)


@pytest.mark.slow
def test_bench_optimizers_reports_ours_against_optax(jobs):
    # --n_layers=0: the embedding, final norm and head (matrices and a vector), a quarter of
    # the leaves to compile for each of the 17 programs; vocab 128 x width 32 = 4096
    # entries per matrix, 8-bit AdamW's min_8bit_size, so its moments are quantized.
    done = run_script(jobs, "bench_optimizers", "--d_model=32", "--n_layers=0",
                      "--vocab_size=128", "--reps=2", "--calls=2", "--steps_per_call=2")
    assert done.returncode == 0, done.stderr
    against_optax = ["adamw", "lion", "sgd_nesterov", "ademamix", "adopt"]
    rows = table_rows(done.stdout, against_optax)
    assert sorted(rows) == sorted(against_optax), done.stdout
    for ours, theirs, ratio in (row[:3] for row in rows.values()):
        assert printed_ratio_is(ratio, ours, theirs, 0.001, 0.001), rows
    # Those optax lacks, against our AdamW, with their state's bytes per parameter: AdamW
    # keeps 8 (two float32 moments), cautious AdamW the same, AdamSAGE 12 (a third float32
    # tree: its sensitivity average), MARS 12 on matrices (its previous gradient) and 8 on the
    # vectors it leaves to AdamW, 8-bit AdamW about 2 plus its block scales; and AdEMAMix
    # (12: its slow EMA too) and ADOPT (8), timed against optax.contrib's above.
    adamw_ms = rows["adamw"][0]
    for name, (low, high) in (("ademamix", (12.0, 12.0)), ("adopt", (8.0, 8.0)),
                              ("adamw_8bit", (2.0, 8.0)), ("mars", (8.0, 12.0)),
                              ("adamsage", (12.0, 12.0)), ("cautious_adamw", (8.0, 8.0)),
                              ("kron", (8.0, 1e9))):
        match = re.search(rf"^{name}: ({NUMBER}) ms/step = ({NUMBER})x ours adamw; state "
                          rf"({NUMBER}) bytes/param \(adamw: 8.000\)$", done.stdout, re.M)
        assert match, (name, done.stdout)
        ms, ratio, per_param = map(float, match.groups())
        assert printed_ratio_is(ratio, ms, adamw_ms, 0.001, 0.001), match.group(0)
        assert low - 1e-3 <= per_param <= high + 1e-3, (name, per_param)


@pytest.mark.parametrize("module, flags, bad", [
    ("bench_shampoo", ["--optimizers=shampoo_eigh,bogus", "--reference_dir="], "bogus"),
    ("bench_shampoo", ["--block_size=0"], "block_size"),
    ("bench_shampoo", ["--train_step", "--lm_shampoo=shampoo_svd", "--reference_dir="],
     "shampoo_svd"),
    ("bench_shampoo", ["--optimizers=", "--reference_dir="], "--optimizers: empty"),
    ("bench_shampoo", ["--train_step", "--lm_shampoo=", "--reference_dir="],
     "--lm_shampoo: empty"),
    ("bench_optimizers", ["--reps=0"], "reps"),
    ("bench_optimizers", ["extra"], "extra"),
])
def test_bad_flags_exit_2_with_one_line_naming_them(jobs, module, flags, bad):
    done = run_script(jobs, module, *flags)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0], done.stderr


@pytest.mark.slow
def test_bench_race_times_the_grid_three_ways_with_ratios(jobs):
    # --noshampoo: Shampoo's two sweeps would double the time; its line is the same
    # arithmetic on the same clocks.
    done = run_script(jobs, "bench_race", "--steps=3", "--grid_lrs=2", "--grid_seeds=1",
                      "--run_evals=1", "--noshampoo")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "2 runs x 3 steps" in out and "shampoo" not in out, out
    rows = {}
    for line in out.splitlines():
        match = re.match(rf"(train per point \(before\)|sweep loop|sweep vmap)\s+({NUMBER})\s+"
                         rf"({NUMBER})\s+({NUMBER})x\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})x",
                         line)
        if match:
            rows[match.group(1)] = [float(x) for x in match.groups()[1:]]
    assert sorted(rows) == ["sweep loop", "sweep vmap", "train per point (before)"], out
    before = rows["train per point (before)"]
    before_wall, before_cpu = before[0], before[3]
    for wall, throughput, vs_wall, cpu, cpu_throughput, vs_cpu in rows.values():
        assert printed_ratio_is(throughput, 2 * 3, wall, 0.1, 0.1)
        assert printed_ratio_is(cpu_throughput, 2 * 3, cpu, 0.1, 0.1)
        assert printed_ratio_is(vs_wall, before_wall, wall, 0.1, 0.01)
        assert printed_ratio_is(vs_cpu, before_cpu, cpu, 0.1, 0.01)
