r"""Scaling laws at CPU scale: IsoFLOP profiles, critical batch size, lr and batch laws, FFNs,
optimizers' speedup against model size.

    ravine-scaling --what=isoflop --preset=smoke --workdir=runs/isoflop_smoke   # ~25 s of CPU
    ravine-scaling --what=isoflop --workdir=runs/isoflop          # the default preset
    ravine-scaling --what=critical_batch --workdir=runs/critical_batch
    ravine-scaling --what=lr_batch --workdir=runs/lr_batch
    ravine-scaling --what=ffn --preset=smoke --workdir=runs/ffn   # the 8-row FFN table
    python -m ravine.experiments.scaling_study --what=ffn --workdir=runs/ffn --seeds=5
    ravine-scaling --what=speedup --workdir=runs/speedup          # AdamW, Muon, SOAP: 22.5 min
    ravine-scaling --what=speedup --optimizers=adamw,muon,lion --workdir=runs/speedup

Every study trains the byte-level LM of the one size ladder (`workloads.LM_LADDER`, shared
with the benchmark: 7 rungs, 5.9k..108k params; the report lists params with embeddings,
Chinchilla's N, and without, Kaplan's N, and `models.flops_per_token`) with one optimizer
(`--optimizer`, default adamw; its settings from its spec, `optim.spec(name)`: the learning
rates are multiples of `centre_lr` and `race_hparams` are passed on; `speedup` trains
`--optimizers`, --optimizer being their baseline), and writes DIR/report.md, a figure and
DIR/results.json (every number the report is rendered from):

- `isoflop` (Chinchilla approach 2, Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556):
  per compute budget C every ladder size trained on D = C / flops_per_token(N) tokens with
  its cosine ending at its last step; per budget a parabola of loss in log N over the 5
  sizes around the lowest loss gives N_opt(C), D_opt(C); power laws N_opt ~ C^a, D_opt ~ C^b
  with bootstrap intervals over seeds (`scaling.bootstrap_isoflop`), in both conventions of
  N; approach 3, L(N, D) = E + A/N^alpha + B/D^beta (`scaling.fit_loss_surface`), whose
  a = beta / (alpha + beta) is compared with approach 2's. isoflop.png is laid out like
  Chinchilla's Figure 3.
- `critical_batch` (McCandlish et al. 2018, https://arxiv.org/abs/1812.06162; Zhang et al.
  2024, https://arxiv.org/abs/2410.21676): steps to a target loss at >= 6 batch sizes, for
  3 model sizes at one data size and 3 data sizes at one model size. A run trains at a
  constant lr after warmup, so one run gives the steps to every target; the target of a
  setting (N, D) is the loss that the smallest batch reaches after D tokens (its best lr).
  The lr is re-tuned per batch size on a 3-point grid (`lr_factors` x centre_lr x
  sqrt(B / 16): the square-root rule's guess, then the best of the grid, per target).
  Per setting `scaling.fit_critical_batch` (S = S_min (1 + B_crit / B)) and
  `scaling.critical_batch_zhang` (20% over perfect scaling) with bootstrap intervals over
  seeds, and the gradient noise scale B_simple (`optim.diagnostics`, McCandlish's two-batch
  estimator: every step's batch split in halves) where the runs cross the target.
  critical_batch.png: steps against batch size with the perfect-scaling line.
- `lr_batch`: an lr x batch-size grid per size of the ladder's width rungs (depth 2, 2
  heads, d_ff = 4 d_model so the MLP scales with the width as muP assumes); the optimal lr
  (a parabola in log lr around the grid's best) and batch size per size, power laws in N
  with bootstrap intervals over seeds; then at each wider size the seed's transfer rule
  (the narrowest size's optimal lr x w_small / w) and muP (`parametrization="mup"`,
  base_width = the narrowest width, its optimal lr unchanged) trained, against the measured
  optimum. lr_batch.png.
- `ffn` (Shazeer 2020, https://arxiv.org/abs/2002.05202): the eight feed-forward variants of
  `models.TransformerConfig(mlp=...)` at equal params (d_ff = 4 d_model, gated ones 2/3 of
  it: the preset's width is a multiple of 3, so the counts are equal exactly) and tokens,
  >= 3 seeds, the table of Shazeer's Table 1 with mean +/- 95% Student-t interval. ffn.png.
- `speedup` (Wen et al. 2025, https://arxiv.org/abs/2509.02046; issue 29): the width rungs
  `WIDTH_RUNGS` (16..48, 8.9x in non-embedding params, d_ff = 4 d_model) in muP (base_width
  the narrowest; `mup_table` picks models/mup.py's table per optimizer), one batch size. Per
  optimizer (default adamw, muon, soap) an lr grid at the narrowest size (the best by mean
  final loss over seeds), carried unchanged up the ladder; the baseline at 1x, 2x and 4x of
  1x = 20 tokens per parameter, the others at 1x, every seed; at the widest size the carried
  lr x {0.5, 2} (seed 0), the re-tune check. Speedup at a size = tokens the baseline needs
  for the optimizer's 1x loss (`scoring.data_speedup` on its 3-point loss-against-tokens
  curve) / tokens used; per optimizer the slope of log speedup against log non-embedding
  params (`scaling.fit_power_law`), bootstrap intervals over seeds; the study's total
  training FLOPs (`speedup_flops`). speedup_vs_size.png. `ravine-bench --preset=scale` runs
  it too (experiments/bench.py).

Runs share compiled programs. A lane is the runs of one model and batch size (seeds, learning
rates, and in `isoflop` every budget: the cosine's length is data, not a constant) side by
side under `jax.vmap`, the optimizer's integer counters unbatched, as in the benchmark
(`experiments.bench`), whose design this follows; a program runs one or more lanes, each
`chunk` steps per call as a `lax.scan`, and evaluates when asked (a `lax.cond`). On CPU a
program's compile time is mostly a fixed cost, so the smoke presets put every lane with the
same number of calls into one program (the 8 FFN variants: 7.8 s of CPU instead of 26 s)
and compile without XLA's backend optimisation; the default presets give each lane a
program of its own, so each finished lane is saved on its own. (The race's sweep engine,
`runtime/sweep.py`, fixes the schedule's length and the batch size in its config and
compiles init, step and eval apart, so it cannot share a program across budgets.)

Resumable after SIGKILL: each job (a program's lanes), when finished, is appended to
DIR/runs.jsonl (one JSON line per run: its settings and its curve), flushed and fsynced; a
restart reads it
back and trains only the runs not in it (a line cut short by the kill is skipped). Runs are
keyed by everything that changes their numbers, so studies in one DIR share identical runs.
DIR/report.md ends with the wall clock: the aggregate model FLOP/s (`flops_per_token` x
tokens trained over the seconds training, compilation excluded) and its fraction of a
measured float32 matmul. Bad flags exit 2 with one line on stderr.

Measured on 2 CPU cores shared with other jobs (load average 8-10, 2026-12-06; seconds of
CPU are what a quiet machine would take): smoke presets isoflop 49 s (22 s of CPU), ffn 47 s
(23 s), critical_batch 54 s (34 s), lr_batch 70 s (62 s); with the fusion emitters off
(`FAST_COMPILE`, load average 4-6): isoflop 41 s (21 s), ffn 40 s (22 s), speedup 38 s (27 s:
per optimizer one train program holds its 4 widths and serves 1x, 2x and 4x, and the widths'
vmapped params init is shared by both optimizers). The default presets, measured one at a
time on the quiet machine (2026-12-06; reports, results and logs in docs/scaling/<what>/):
isoflop 7 min 1 s, ffn 5 min 6 s, critical_batch 8 min 7 s, lr_batch 8 min 45 s (its
widened 7-point grid), speedup 22 min 29 s (2150 s of CPU, 29.8 GFLOP/s aggregate: SOAP
1.47-1.63x AdamW's data at every width, Muon 0.54x at the narrowest to 1.21x at the widest).
README's "Scaling laws" section gives their tables and what they say.
"""
import functools
import json
import math
import os
import sys
import textwrap
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from matplotlib.figure import Figure

from ravine import models, optim
from ravine.experiments import race_stats, scaling, scoring, workloads
from ravine.experiments.runtime import cli
from ravine.experiments.runtime import workdir as workdir_lib
from ravine.experiments.runtime.metrics import write_atomically
from ravine.experiments.runtime.state import shared_counters
from ravine.experiments.runtime.timing import matmul_flops_per_second
from ravine.models.transformer import GATED_MLPS, MLPS

WHATS = ("isoflop", "critical_batch", "lr_batch", "ffn", "speedup")
RUNS_FILE, REPORT_FILE, RESULTS_FILE = "runs.jsonl", "report.md", "results.json"
FIGURES = {**{what: f"{what}.png" for what in WHATS}, "speedup": "speedup_vs_size.png"}
TIMING_HEADING = "## Wall clock"   # everything measured in seconds sits below it
FORMAT = 1                         # of the runs' keys (a change retrains every run)
# XLA options of the `fast_compile` presets' train programs and of every init program: faster
# compiles of these tiny programs (measured 2.3 s instead of 3.9 s of CPU for the tiny rung's
# train chunk, 1.3 s instead of 5.5 s for its vmapped init), ~3x slower steps. Without
# XLA:CPU's fusion emitters a train chunk of `small` compiles in 1.4 s of CPU instead of 3.6 s
# (its init 1.6 s instead of 2.5 s), with the same losses to the last bit (2026-12-06).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# The warmup-cosine shape is built once at this horizon and read at `step * HORIZON /
# run_steps`, so a run's length is data of the compiled program, not a constant.
HORIZON = 1 << 20
LR_REFERENCE_BATCH = 16   # rows; the batch at which spec.centre_lr is a good lr (the race's)
CONFIDENCE = 0.95
# The ladder's rungs of one depth (2) and head count (2), narrowest first: the widths 16, 24,
# 32, 48 (non-embedding params 8.3k..74k with d_ff = 4 d_model, 8.9x), along which muP
# carries a learning rate.
WIDTH_RUNGS = ("small", "compact", "medium", "wide")

# Shazeer 2020, Table 1: log-perplexity on C4 after 65,536 steps (each +/- 0.003..0.010).
SHAZEER_65K = {"relu": 1.997, "gelu": 1.983, "swish": 1.994, "glu": 1.982, "bilinear": 1.960,
               "geglu": 1.942, "swiglu": 1.944, "reglu": 1.953}
FFN_NAMES = {"relu": "FFN_ReLU", "gelu": "FFN_GELU", "swish": "FFN_Swish", "glu": "FFN_GLU",
             "bilinear": "FFN_Bilinear", "geglu": "FFN_GEGLU", "swiglu": "FFN_SwiGLU",
             "reglu": "FFN_ReGLU"}
# Hoffmann et al. 2022, Table 2 (N_opt ~ C^a, D_opt ~ C^b) and Kaplan et al. 2020.
PUBLISHED = [("Chinchilla approach 1", "0.50 (0.488, 0.502)", "0.50 (0.501, 0.512)"),
             ("Chinchilla approach 2", "0.49 (0.462, 0.534)", "0.51 (0.483, 0.529)"),
             ("Chinchilla approach 3", "0.46 (0.454, 0.455)", "0.54 (0.542, 0.543)"),
             ("Kaplan et al. 2020", "0.73", "0.27")]


# ------------------------------------------------------------------------------- presets

class IsoflopPreset(NamedTuple):
    """budgets: the compute budgets C (training FLOPs per run), multiples of the smallest:
    a size's steps at the smallest budget are one call of its program and C / C_min calls
    at C, so every budget shares the size's program; sizes: the ladder rungs trained at
    every budget (a run with fewer than `min_steps` steps is left out); window: the sizes
    around a budget's lowest loss that its parabola is fitted on; lr_factor: the lr is
    lr_factor x centre_lr; warmup: fraction of each run's steps; resamples: bootstrap
    draws; surface_starts: L-BFGS starts of approach 3 (`fit_loss_surface`'s num_starts);
    lanes: sizes per program (see `execute`)."""
    budgets: tuple
    sizes: tuple
    window: int
    seeds: int
    lr_factor: float
    warmup: float
    min_steps: int
    resamples: int
    surface_starts: int
    lanes: int
    fast_compile: bool
    about: str


class CriticalBatchPreset(NamedTuple):
    """sizes: the model-size axis (at data `data[len(data) // 2]`); reference: the size of
    the data axis; data: data sizes D in tokens per parameter of `reference`; batch_sizes:
    rows of seq_len tokens (even, smallest first: it sets the targets); lr_factors: the lr
    grid per batch size, x centre_lr x sqrt(B / 16); overshoot: a batch size B above the
    smallest B0 trains on min(B / B0, overshoot) x the largest D of its size (as many steps
    as B0 at most: steps to a target do not grow with B); evals: evaluations
    per run, one per call (the steps-to-target resolution; crossings are interpolated);
    warmup: fraction of each run's steps, then a constant lr; lanes: (size, batch) lanes
    per program."""
    sizes: tuple
    reference: str
    data: tuple
    batch_sizes: tuple
    lr_factors: tuple
    seeds: int
    overshoot: float
    evals: int
    warmup: float
    resamples: int
    lanes: int
    fast_compile: bool
    about: str


class LrBatchPreset(NamedTuple):
    """sizes: ladder rungs of one depth and head count, narrowest first (the transfer's
    source; d_ff is set to 4 d_model); lr_factors: x centre_lr; batch_sizes: rows;
    reference_batch: the batch of the lr law and of the transfer runs; tokens_per_param:
    every run's data; warmup: fraction of each run's steps, then a cosine to 0.1x; calls:
    calls of the program per run; lanes: (size, batch) lanes per program."""
    sizes: tuple
    lr_factors: tuple
    batch_sizes: tuple
    reference_batch: int
    tokens_per_param: float
    seeds: int
    warmup: float
    calls: int
    resamples: int
    lanes: int
    fast_compile: bool
    about: str


class FfnPreset(NamedTuple):
    """size: the ladder rung (d_model a multiple of 3: equal params exactly); tokens_per_param:
    every variant's data (of the common param count); lr_factor: x centre_lr; calls: calls
    of the program per run (steps are rounded to a multiple); lanes: variants per program."""
    size: str
    tokens_per_param: float
    seeds: int
    lr_factor: float
    warmup: float
    calls: int
    lanes: int
    fast_compile: bool
    about: str


class SpeedupPreset(NamedTuple):
    """sizes: width rungs of one depth and head count, narrowest first (>= 4, spanning >= 8x
    in non-embedding params; d_ff = 4 d_model; muP with base_width the narrowest width);
    optimizers: the study's, the baseline (`--optimizer`) among them; batch_size: rows, at
    every size (muP carries the lr across width, not across batch sizes); tokens_per_param:
    1x, per param with embeddings (Chinchilla's N); multiples: the baseline's data sizes in
    units of 1x (the others train at 1x); lr_factors: the lr grid at the narrowest size, x
    centre_lr; retune_factors: x the carried lr at the widest size, seed 0 only (x1 is the
    carried run); warmup: fraction of each run's steps, then a cosine to 0.1x; calls: calls
    of the program per 1x run (a run at k x makes k x as many calls of the same program);
    resamples: bootstrap draws of the seeds; lanes: lanes per program."""
    sizes: tuple
    optimizers: tuple
    batch_size: int
    tokens_per_param: float
    multiples: tuple
    lr_factors: tuple
    retune_factors: tuple
    seeds: int
    warmup: float
    calls: int
    resamples: int
    lanes: int
    fast_compile: bool
    about: str


PRESETS = {
    "isoflop": {
        "smoke": IsoflopPreset(
            budgets=(4e8, 8e8), sizes=("tiny", "mini", "small"), window=3, seeds=2,
            lr_factor=1.0, warmup=0.1, min_steps=4, resamples=200, surface_starts=2,
            lanes=8, fast_compile=True,
            about="a check that everything runs (the tests run it): 2 budgets x 3 sizes x 2 "
            "seeds of 4..26 steps; its fits say nothing"),
        "default": IsoflopPreset(
            budgets=(3e10, 6e10, 1.2e11, 2.4e11), sizes=tuple(workloads.LM_LADDER), window=5,
            seeds=2, lr_factor=1.0, warmup=0.1, min_steps=10, resamples=1000,
            surface_starts=16, lanes=1, fast_compile=False,
            about="4 budgets spanning 8x, every ladder size at each (5 fitted per budget), "
            "2 seeds: 6.3e12 training FLOPs"),
    },
    "critical_batch": {
        "smoke": CriticalBatchPreset(
            sizes=("tiny", "mini"), reference="tiny", data=(1.0, 2.0), batch_sizes=(2, 4, 8),
            lr_factors=(1.0, 2.0), seeds=2, overshoot=2.0, evals=5, warmup=0.05,
            resamples=100, lanes=8, fast_compile=True,
            about="a check that everything runs (the tests run it): 2 sizes, 2 data sizes, "
            "3 batch sizes; its numbers say nothing"),
        "default": CriticalBatchPreset(
            sizes=("tiny", "small", "medium"), reference="small", data=(4.0, 8.0, 16.0),
            batch_sizes=(2, 4, 8, 16, 32, 64), lr_factors=(0.5, 1.0, 2.0), seeds=2,
            overshoot=3.0, evals=30, warmup=0.02, resamples=500, lanes=1,
            fast_compile=False,
            about="3 model sizes at 8 tokens per param of `small`, 3 data sizes (4, 8, 16 "
            "tokens per param) for `small`, 6 batch sizes, a 3-point lr grid per batch, 2 "
            "seeds: 6.5e12 training FLOPs"),
    },
    "lr_batch": {
        "smoke": LrBatchPreset(
            sizes=("small", "compact"), lr_factors=(0.5, 1.0, 2.0),
            batch_sizes=(8, 16), reference_batch=16, tokens_per_param=0.25, seeds=2,
            warmup=0.1, calls=1, resamples=100, lanes=8, fast_compile=True,
            about="a check that everything runs (the tests run it): 2 widths, 3 lrs, 2 "
            "batch sizes, a few steps; its numbers say nothing"),
        "default": LrBatchPreset(
            sizes=("small", "compact", "medium", "wide"),
            lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), batch_sizes=(8, 16, 32),
            reference_batch=16, tokens_per_param=3.0, seeds=2, warmup=0.1, calls=10,
            resamples=500, lanes=1, fast_compile=False,
            about="the width ladder (16, 24, 32, 48 at depth 2), 7 lrs (0.25x to 16x the "
            "spec's) x 3 batch sizes x 2 seeds at 3 tokens per param, then the transfer "
            "runs: 1.1e13 training FLOPs"),
    },
    "ffn": {
        "smoke": FfnPreset(
            size="mini", tokens_per_param=1.0, seeds=3, lr_factor=1.0, warmup=0.1, calls=2,
            lanes=8, fast_compile=True,
            about="a check that everything runs (the tests run it): the 8 variants of `mini` "
            "(d_model 12), 3 seeds, a few dozen steps; its numbers say nothing"),
        "default": FfnPreset(
            size="compact", tokens_per_param=60.0, seeds=3, lr_factor=1.0, warmup=0.1,
            calls=20, lanes=1, fast_compile=False,
            about="the 8 variants of `compact` (d_model 24, 2 layers), 60 tokens per param, 3 "
            "seeds: 6e12 training FLOPs"),
    },
    "speedup": {
        "smoke": SpeedupPreset(
            sizes=WIDTH_RUNGS, optimizers=("adamw", "muon"), batch_size=4,
            tokens_per_param=0.005, multiples=(1, 2, 4), lr_factors=(1.0,),
            retune_factors=(1.0,), seeds=2, warmup=0.0, calls=1, resamples=200,
            lanes=16, fast_compile=True,
            about="a check that everything runs (the tests run it): the 4 widths, adamw and "
            "muon, 1 to 8 steps of 4 x 64 tokens, a one-point lr grid (no tuning: the ladder "
            "trains with it) and a one-point re-tune (the carried runs, read back); its "
            "speedups say nothing"),
        "default": SpeedupPreset(
            sizes=WIDTH_RUNGS, optimizers=("adamw", "muon", "soap"), batch_size=32,
            tokens_per_param=20.0, multiples=(1, 2, 4), lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0),
            retune_factors=(0.5, 2.0), seeds=2, warmup=0.1, calls=10, resamples=1000,
            lanes=1, fast_compile=False,
            about="the 4 widths (16..48, 8.9x in non-embedding params) at 20 tokens per "
            "param, adamw at 1x/2x/4x, a 5-point lr grid at `small`, 2 seeds, the re-tune "
            "at `wide`: 3.65e13 training FLOPs, ~45 min of 2 cores (measured 12-21 GFLOP per "
            "CPU second for medium and wide; adamw is 70% of the FLOPs)"),
    },
}


# ---------------------------------------------------------------------------- the engine

class Arm(NamedTuple):
    """What one lane trains: a ladder rung, overrides of its model, a batch size.

    Attributes:
      size: the `workloads.LM_LADDER` rung.
      batch_size: rows of seq_len tokens per step.
      mlp, d_ff: the feed-forward variant and width (None: the rung's).
      parametrization, base_width: "sp" or "mup" and muP's base width.
    """
    size: str
    batch_size: int
    mlp: str | None = None
    d_ff: int | None = None
    parametrization: str = "sp"
    base_width: int | None = None

    def overrides(self) -> dict:
        """The `workloads.lm_config` overrides."""
        out = {"batch_size": self.batch_size}
        for field in ("mlp", "d_ff", "base_width"):
            if getattr(self, field) is not None:
                out[field] = getattr(self, field)
        if self.parametrization != "sp":
            out["parametrization"] = self.parametrization
        return out


class Recipe(NamedTuple):
    """How every run of a study trains (compile-time constants of its programs).

    Attributes:
      optimizer: the registered name; its factory takes the lr schedule and the spec's
        `race_hparams`.
      schedule: "cosine" (linear warmup, half cosine to 0.1x at the run's last step) or
        "constant" (linear warmup, then constant).
      warmup: the warmup's fraction of the run's steps.
      gns: also measure the gradient noise scale (each step's batch in two halves).
      fast_compile: compile with `FAST_COMPILE`.
    """
    optimizer: str
    schedule: str
    warmup: float
    gns: bool = False
    fast_compile: bool = False


class Run(NamedTuple):
    """One training run: a program's arm and the run's data (lr, seed, length)."""
    arm: Arm
    lr: float
    seed: int
    steps: int
    chunk: int         # steps per compiled call; divides steps and eval_every
    eval_every: int    # evaluate after every this many steps (and at the end)

    def key(self, recipe) -> dict:
        """Everything that changes the run's numbers, as JSON gives it back."""
        spec = optim.spec(recipe.optimizer)
        # a muP table other than Adam's (Muon's, SOAP's) is named; Adam's keys stay as they
        # were when every optimizer got Adam's table
        table = mup_table(recipe.optimizer) if self.arm.parametrization == "mup" else "adam"
        return json.loads(json.dumps({
            "format": FORMAT, "shape": workloads.LM_LADDER[self.arm.size],
            **self.arm._asdict(), **recipe._asdict(), "fixed": dict(spec.race_hparams),
            **({"mup_table": table} if table != "adam" else {}),
            "lr": float(self.lr), "seed": int(self.seed), "steps": int(self.steps),
            "eval_every": int(self.eval_every)}, default=str))


def mup_table(optimizer) -> str:
    """The `models.mup_lr_multipliers` table of a registered optimizer: models/mup.py's own
    for the width-aware ones (Muon, SOAP: multiplier 1, their hidden matrices' steps do not
    grow with width), else the Adam family's (1 / r on hidden matrices; Shampoo's too)."""
    return optimizer if optimizer in models.mup.WIDTH_AWARE else "adam"


def _key_id(key) -> str:
    return json.dumps(key, sort_keys=True)


class Store:
    """DIR/runs.jsonl: one line `{"key": ..., "result": ...}` per finished run.

    A job's lines are appended together, flushed and fsynced when the job finishes; a
    restart reads them back. A line a kill cut short does not parse and is skipped (its run
    trains again)."""

    def __init__(self, workdir):
        self.path = os.path.join(workdir, RUNS_FILE)
        self.results, self.damaged = {}, 0
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        self.results[_key_id(record["key"])] = record["result"]
                    except (ValueError, KeyError, TypeError):
                        self.damaged += 1

    def get(self, run, recipe):
        return self.results.get(_key_id(run.key(recipe)))

    def add(self, items):
        """Appends `[(key, result)]` as one write, then flushes and fsyncs."""
        text = "".join(json.dumps({"key": key, "result": result}) + "\n"
                       for key, result in items)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():   # a kill may have left a last line without its newline
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        for key, result in items:
            self.results[_key_id(key)] = result


def _sq_norm(tree):
    return sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree))


class ArmFns:
    """The pieces of one (arm, recipe): its workload (model, data, eval), a run's optimizer,
    one step of one run and its evaluation; the programs are built from these."""

    def __init__(self, arm, recipe):
        self.arm, self.recipe = arm, recipe
        self.spec = optim.spec(recipe.optimizer)
        self.workload = lm_workload(arm)
        self.config, self.batch_size, self.seq_len = workloads.lm_config(
            arm.size, **arm.overrides())
        # muP's per-leaf lr multipliers, of the optimizer's table (`mup_table`).
        self.multipliers = (models.mup_lr_multipliers(
            jax.eval_shape(self.workload.init, jax.random.key(0)), self.config,
            mup_table(recipe.optimizer)) if arm.parametrization == "mup" else None)
        end = 1.0 if recipe.schedule == "constant" else None   # None: 0.1x the peak
        self.shape = optim.schedules.warmup_cosine(
            1.0, HORIZON, round(recipe.warmup * HORIZON), end_value=end)

    def make_tx(self, lr, steps):
        """The optimizer of a run with peak lr `lr` over `steps` steps (traced or not)."""
        def multiplier(count):
            return self.shape(count * (HORIZON / steps))

        def scheduled(peak):
            return lambda count: peak * multiplier(count)

        # A second learning rate in the spec's race_hparams (Muon's adam_learning_rate)
        # follows the same schedule shape, as in the benchmark.
        fixed = {k: (scheduled(v) if k.endswith("_learning_rate") and isinstance(v, float)
                     else v) for k, v in self.spec.race_hparams.items()}
        tx = self.spec.factory(learning_rate=scheduled(lr), **fixed)
        if self.multipliers is not None:
            tx = optax.chain(tx, optim.scale_by_multipliers(self.multipliers))
        return tx

    def one_step(self, params, opt_state, batch, lr, steps):
        """One update of one run: (params, opt_state, loss, |G_half|^2, |G|^2)."""
        loss_fn = self.workload.loss_fn
        if self.recipe.gns:
            # McCandlish's two-batch estimator needs |G|^2 at two batch sizes: the mean of
            # the halves' gradients is the batch's gradient (equal halves), so this costs
            # no extra FLOPs.
            half = batch.shape[0] // 2
            (l1, g1), (l2, g2) = (jax.value_and_grad(loss_fn)(params, batch[:half]),
                                  jax.value_and_grad(loss_fn)(params, batch[half:]))
            loss = (l1 + l2) / 2
            grads = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
            small, big = (_sq_norm(g1) + _sq_norm(g2)) / 2, _sq_norm(grads)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            small = big = jnp.zeros((), jnp.float32)
        updates, opt_state = self.make_tx(lr, steps).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, small, big

    def evaluate(self, params, opt_state):
        point = self.spec.eval_params(params, opt_state) if self.spec.eval_params else params
        return jnp.asarray(self.workload.eval(point), jnp.float32)


@functools.lru_cache(maxsize=None)
def lm_workload(arm) -> workloads.Workload:
    """`workloads.lm` of the arm's rung with its overrides, built once per process (each
    build reads the corpus's fingerprint and counts the params)."""
    return workloads.lm(arm.size, **arm.overrides())


class Lane(NamedTuple):
    """One arm's runs in a program: `n_runs` side by side, `chunk` steps per call."""
    arm: Arm
    n_runs: int
    chunk: int


_ARMS = {}       # (arm, recipe) -> ArmFns
_PROGRAMS = {}   # (recipe, lanes) -> the compiled call
_COMPILED = {"seconds": 0.0}


def arm_fns(arm, recipe) -> ArmFns:
    """The `ArmFns` of (arm, recipe), made once per process."""
    if (arm, recipe) not in _ARMS:
        _ARMS[arm, recipe] = ArmFns(arm, recipe)
    return _ARMS[arm, recipe]


def compile_seconds() -> float:
    """Seconds spent compiling programs in this process so far."""
    return _COMPILED["seconds"]


def _compile(fn, args, options, donate=()):
    began = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile(options)
    _COMPILED["seconds"] += time.perf_counter() - began
    return compiled


def _params_fn(shapes):
    """`seeds -> per lane the params of its runs`: the workload's init of each seed under
    `jax.vmap`, for `shapes` ((arm, runs) per lane)."""
    inits = [lm_workload(arm).init for arm, _ in shapes]

    def init_params(seeds):
        return tuple(jax.vmap(lambda seed, init=init: init(jax.random.key(seed)))(x)
                     for init, x in zip(inits, seeds))
    return init_params


def init_program(recipe, lanes, args):
    """The init of `lanes`: `(seeds, lrs, steps) -> per lane (params, opt_state)`, a lane's
    runs side by side (`jax.vmap`), the optimizer's integer counters kept once.

    Two programs, each compiled once per process: the params of every lane, which depend on
    the arms and run counts only, so that every optimizer's jobs of the same lanes share it
    (the speedup study's optimizers: the vmapped init of the 4 widths compiles in 7.7 s of
    CPU), and the optimizer states (`make_tx(lr, steps).init`, of each optimizer)."""
    seeds = args[0]
    shapes = tuple((lane.arm, lane.n_runs) for lane in lanes)
    # Always with FAST_COMPILE: they run once per job, and XLA's optimisation of the vmapped
    # threefry of every param shape is slow (measured 5.5 s of CPU for the tiny rung, 1.3 s
    # without).
    if ("params", shapes) not in _PROGRAMS:
        _PROGRAMS["params", shapes] = _compile(_params_fn(shapes), (seeds,), FAST_COMPILE)
    if ("init", recipe, shapes) not in _PROGRAMS:
        fns = [arm_fns(arm, recipe) for arm, _ in shapes]

        def init_states(params, lrs, steps):
            out = []
            for f, *xs in zip(fns, params, lrs, steps):
                def one(p, lr, length, f=f):
                    return f.make_tx(lr, length).init(p)
                state = jax.vmap(one)(*xs)
                mask = shared_counters(jax.eval_shape(one, *jax.tree.map(lambda x: x[0], xs)))
                out.append(jax.tree.map(lambda leaf, shared: leaf[0] if shared else leaf,
                                        state, mask))
            return tuple(out)

        params = jax.eval_shape(_params_fn(shapes), seeds)
        _PROGRAMS["init", recipe, shapes] = _compile(init_states, (params, *args[1:]),
                                                     FAST_COMPILE)
    init_params = _PROGRAMS["params", shapes]
    init_states = _PROGRAMS["init", recipe, shapes]

    def init(seeds, lrs, steps):
        params = init_params(seeds)
        return tuple(zip(params, init_states(params, lrs, steps)))
    return init


def program(recipe, lanes, args):
    """The compiled call of `lanes` (made once per process; `args` give the shapes).

    A call runs, for each lane, its `chunk` steps as a `lax.scan` of the lane's step
    (`jax.vmap` over its runs' params, optimizer states, batches, lrs and lengths; the
    optimizer's integer counters unbatched, as in the benchmark), then, if `evaluate`, each
    lane's eval losses (a `lax.cond`; NaN otherwise). Lanes of different models share the
    call because compiling has a large fixed cost per program on CPU (measured: the 8 FFN
    variants of `mini` in one program compile in 7.8 s of CPU, one by one in 26 s).
    """
    if (recipe, lanes) in _PROGRAMS:
        return _PROGRAMS[recipe, lanes]
    fns = [arm_fns(lane.arm, recipe) for lane in lanes]
    masks = [shared_counters(carry[1]) for carry in args[0]]

    def lane_call(f, mask, carry, batches, lr, steps, evaluate):
        axes = jax.tree.map(lambda shared: None if shared else 0, mask)

        def step(carry, batch):
            params, opt_state = carry
            params, new, loss, small, big = jax.vmap(
                f.one_step, in_axes=(0, axes, 0, 0, 0))(params, opt_state, batch, lr, steps)
            # The counters advanced alike in every run: keep one (as the benchmark).
            new = jax.tree.map(lambda leaf, shared: leaf.max(0) if shared else leaf, new,
                               mask)
            return (params, new), (loss, small, big)

        carry, (loss, small, big) = jax.lax.scan(step, carry, batches)
        metric = jax.lax.cond(
            evaluate, lambda c: jax.vmap(f.evaluate, in_axes=(0, axes))(*c),
            lambda c: jnp.full(lr.shape, jnp.nan, jnp.float32), carry)
        return carry, loss.mean(0), small.mean(0), big.mean(0), metric

    def call(carries, batches, lrs, steps, evaluate):
        outs = [lane_call(*xs, evaluate) for xs in zip(fns, masks, carries, batches, lrs,
                                                       steps)]
        return tuple(zip(*outs))   # (carries, losses, smalls, bigs, metrics), per lane

    _PROGRAMS[recipe, lanes] = _compile(call, args, FAST_COMPILE if recipe.fast_compile
                                        else None, donate=(0,))
    return _PROGRAMS[recipe, lanes]


def train_job(lane_runs, recipe, log=print) -> list[list[dict]]:
    """Trains lanes of runs in one program; `lane_runs` is a list of lanes, each a list of
    runs of one arm, steps, chunk and eval_every, all lanes with the same number of calls
    (steps / chunk) and evaluations. Returns the results, lane by lane.

    A result: `curve` [[step, eval loss or None]], `final_loss` (the last eval; None if
    not finite), `final_train_loss` (the last call's mean), `gns` [[step, |G_half|^2,
    |G|^2]] per call (with `recipe.gns`), the run's `params`, `non_embedding_params`,
    `flops_per_token`, `tokens`, `seconds` (its share, by model FLOPs, of the job's
    training time, compilation excluded) and `diverged`.
    """
    fns = [arm_fns(runs[0].arm, recipe) for runs in lane_runs]
    compiled_before = compile_seconds()
    calls = lane_runs[0][0].steps // lane_runs[0][0].chunk
    eval_calls = lane_runs[0][0].eval_every // lane_runs[0][0].chunk
    seeds = tuple(np.array([run.seed for run in runs], np.int32) for runs in lane_runs)
    lrs = tuple(np.array([run.lr for run in runs], np.float32) for runs in lane_runs)
    lengths = tuple(np.array([run.steps for run in runs], np.float32) for runs in lane_runs)
    lanes = tuple(Lane(runs[0].arm, len(runs), runs[0].chunk) for runs in lane_runs)
    carries = init_program(recipe, lanes, (seeds, lrs, lengths))(seeds, lrs, lengths)

    def batches(call):   # per lane [chunk, runs, B, T + 1]; one seed, one data order
        out = []
        for f, runs in zip(fns, lane_runs):
            chunk, seeds = runs[0].chunk, [run.seed for run in runs]
            per_seed = {s: np.stack([f.workload.batch(s, i) for i in
                                     range(call * chunk, (call + 1) * chunk)])
                        for s in set(seeds)}
            out.append(np.stack([per_seed[s] for s in seeds], axis=1))
        return tuple(out)

    call_fn = program(recipe, lanes, (carries, batches(0), lrs, lengths, np.bool_(True)))
    curves = [[[] for _ in runs] for runs in lane_runs]
    gns = [[[] for _ in runs] for runs in lane_runs]
    seconds, losses = [], None
    for call in range(calls):
        evaluate = (call + 1) % eval_calls == 0 or call + 1 == calls
        data = batches(call)
        began = time.perf_counter()
        carries, losses, small, big, metric = call_fn(carries, data, lrs, lengths,
                                                      np.bool_(evaluate))
        metric = jax.device_get(metric)   # waits for the call
        seconds.append(time.perf_counter() - began)
        small, big = jax.device_get((small, big))
        for k, runs in enumerate(lane_runs):
            end = (call + 1) * runs[0].chunk
            for i in range(len(runs)):
                if recipe.gns:
                    gns[k][i].append([end, _finite(small[k][i]), _finite(big[k][i])])
                if evaluate:
                    curves[k][i].append([end, _finite(metric[k][i])])
    # The first call of a freshly compiled program is slower: time the others (x calls).
    timed = seconds[1:] or seconds
    job_seconds = sum(timed) * len(seconds) / len(timed)
    losses = jax.device_get(losses)
    results, flops = [], []
    for k, (f, runs) in enumerate(zip(fns, lane_runs)):
        lane = []
        for i, run in enumerate(runs):
            final, train = curves[k][i][-1][1], _finite(losses[k][i])
            result = {"curve": curves[k][i], "final_loss": final, "final_train_loss": train,
                      "params": f.workload.n_params,
                      "non_embedding_params": models.non_embedding_params(f.config),
                      "flops_per_token": models.flops_per_token(f.config, f.seq_len),
                      "tokens": run.steps * f.batch_size * f.seq_len,
                      "diverged": final is None or train is None}
            if recipe.gns:
                result["gns"] = gns[k][i]
            flops.append(result["flops_per_token"] * result["tokens"])
            lane.append(result)
        results.append(lane)
    total = sum(flops)
    for result, share in zip((r for lane in results for r in lane), flops):
        result["seconds"] = job_seconds * share / total
    log("scaling: " + ", ".join(_lane_name(runs) for runs in lane_runs)
        + f": {calls} call(s), {job_seconds:.1f} s (compile "
        f"{compile_seconds() - compiled_before:.1f} s)")
    return results


def _lane_name(runs):
    arm = runs[0].arm
    extra = "".join(f" {k}={v}" for k, v in arm.overrides().items() if k != "batch_size")
    return f"{arm.size} (B {arm.batch_size}{extra}) {len(runs)}x{runs[0].steps} steps"


def _finite(value):
    value = float(value)
    return value if math.isfinite(value) else None


def execute(runs, recipe, store, max_lanes=1, log=print) -> dict:
    """Trains the runs that `store` lacks; returns `{run: result}` for all of `runs`.

    Runs of one arm, length, chunk and eval schedule form a lane; lanes with the same number
    of calls and evaluations share a program, up to `max_lanes` per program (the smoke
    presets put everything they can in one program; the default ones 1, so each finished
    lane is saved on its own). Each job's results are appended to the store when it ends.
    """
    lanes = {}
    for run in dict.fromkeys(runs):
        if store.get(run, recipe) is None:
            lanes.setdefault((run.arm, run.steps, run.chunk, run.eval_every), []).append(run)
    jobs = {}
    for (arm, steps, chunk, every), lane in lanes.items():
        jobs.setdefault((steps // chunk, every // chunk), []).append(lane)
    for lane_list in jobs.values():
        for i in range(0, len(lane_list), max_lanes):
            part = lane_list[i:i + max_lanes]
            results = train_job(part, recipe, log)
            store.add([(run.key(recipe), result) for lane, lane_results in zip(part, results)
                       for run, result in zip(lane, lane_results)])
    return {run: store.get(run, recipe) for run in runs}


# ------------------------------------------------------------------------------ the plan

class Plan(NamedTuple):
    """A validated invocation: which study, with which preset, where. `optimizer` trains
    every run of a study, except `speedup`'s: there it is the baseline, and `optimizers`
    (the baseline among them) are the optimizers compared."""
    what: str
    preset_name: str
    preset: Any
    workdir: str
    seeds: int
    optimizer: str
    optimizers: tuple = ()


def _check_optimizer(flag, name):
    """Raises cli.UsageError unless `name` is registered and can run in these studies."""
    try:
        spec = optim.spec(name)
    except ValueError:
        raise cli.UsageError(f"unknown {flag} {name!r}; known: "
                             f"{', '.join(s.name for s in optim.specs())}") from None
    why = ("it brings its own train step" if not spec.is_transform else
           "its update takes extra arguments" if spec.update_args is not None else
           "it takes a constant learning rate (its own schedule)" if spec.constant_lr else
           "its runs cannot share a vmapped program" if not spec.vmappable else None)
    if why:
        raise cli.UsageError(f"{flag} {name!r} cannot run in the scaling study: "
                             f"{why}; the study trains Optax transforms side by side under "
                             "one warmup schedule")


def _check_width_ladder(preset_name, sizes):
    """Raises cli.UsageError unless `sizes` are >= 4 known rungs of one depth and head
    count, narrowest first, spanning >= 8x in non-embedding params (issue 29's ladder)."""
    unknown = [s for s in sizes if s not in workloads.LM_LADDER]
    if unknown:
        raise cli.UsageError(f"the speedup preset {preset_name!r} names unknown ladder "
                             f"size(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(workloads.LM_LADDER)}")
    shapes = {(workloads.LM_LADDER[s]["n_layers"], workloads.LM_LADDER[s]["n_heads"])
              for s in sizes}
    widths = [workloads.LM_LADDER[s]["d_model"] for s in sizes]
    # non-embedding params grow as width^2 at a fixed depth (d_ff = 4 d_model)
    span = (widths[-1] / widths[0]) ** 2 if widths else 0.0
    if len(sizes) < 4 or len(shapes) > 1 or widths != sorted(set(widths)) or span < 8:
        raise cli.UsageError(
            f"the speedup preset {preset_name!r} has sizes {','.join(sizes)}: it needs >= 4 "
            "ladder rungs of one depth and head count, narrowest first, spanning >= 8x in "
            f"non-embedding params (got {len(sizes)}, {span:.1f}x), e.g. "
            f"{','.join(WIDTH_RUNGS)}")


def make_plan(what, preset="default", workdir=None, seeds=None, optimizer="adamw",
              optimizers=None) -> Plan:
    """Validates the flags' values (None: the preset's) into a `Plan`.

    Raises:
      cli.UsageError: naming the bad value (no or an unknown study or preset, no workdir,
        seeds < 1, an unknown optimizer or one that cannot run here; for `speedup`, a
        baseline not among `optimizers`, an optimizer named twice, fewer than 2, a preset
        without >= 4 sizes spanning >= 8x; `optimizers` for another study).
    """
    if not what:
        raise cli.UsageError(f"--what is required: one of {', '.join(WHATS)}")
    if what not in WHATS:
        raise cli.UsageError(f"unknown --what {what!r}; known: {', '.join(WHATS)}")
    if preset not in PRESETS[what]:
        raise cli.UsageError(f"unknown --preset {preset!r}; known: "
                             f"{', '.join(PRESETS[what])}")
    if not workdir:
        raise cli.UsageError("--workdir is required")
    chosen = PRESETS[what][preset]
    seeds = chosen.seeds if seeds is None else seeds
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise cli.UsageError(f"--seeds must be an integer >= 1, got {seeds!r}")
    _check_optimizer("--optimizer", optimizer)
    if what == "ffn" and workloads.LM_LADDER[chosen.size]["d_model"] % 3:
        raise cli.UsageError(f"the ffn preset's size {chosen.size!r} needs d_model divisible "
                             "by 3 (gated d_ff = 2/3 of 4 d_model)")
    if what != "speedup":
        if optimizers:
            raise cli.UsageError(f"--optimizers is for --what=speedup; --what={what} trains "
                                 "one --optimizer")
        return Plan(what, preset, chosen, workdir, seeds, optimizer)
    _check_width_ladder(preset, chosen.sizes)
    names = tuple(optimizers) if optimizers else chosen.optimizers
    for name in names:
        _check_optimizer("--optimizers entry", name)
    if len(set(names)) != len(names):
        raise cli.UsageError(f"--optimizers names an optimizer twice: {','.join(names)}")
    if optimizer not in names:
        raise cli.UsageError(f"the baseline --optimizer {optimizer!r} is not among "
                             f"--optimizers={','.join(names)}")
    if len(names) < 2:
        raise cli.UsageError(f"--optimizers={','.join(names)}: the speedup study compares "
                             "at least one optimizer with the baseline")
    return Plan(what, preset, chosen, workdir, seeds, optimizer, names)


# ----------------------------------------------------------------------------- helpers

def _steps(tokens, batch_size, seq_len, multiple):
    """Steps for `tokens` tokens, rounded to a multiple of `multiple` (at least one)."""
    return max(multiple, multiple * round(tokens / (batch_size * seq_len) / multiple))


def _params(arm) -> int:
    return lm_workload(arm).n_params


def _ladder(sizes):
    return {row["size"]: row for row in workloads.ladder_table(sizes)}


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _fmt(value, spec=".4g"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None or math.isnan(value) else "inf"
    return format(value, spec)


def _interval(samples, confidence=CONFIDENCE):
    """The percentile interval of the finite samples, or None if there are none."""
    samples = np.asarray([s for s in samples if s is not None and math.isfinite(s)], float)
    if samples.size == 0:
        return None
    return [float(x) for x in np.quantile(samples, [(1 - confidence) / 2,
                                                    (1 + confidence) / 2])]


def _short(error, width=240):
    """A fit's error as one line of at most `width` characters (they quote their data)."""
    return textwrap.shorten(cli.one_line(error), width, placeholder=" ...")


def _fmt_interval(interval, spec=".3g"):
    return "-" if interval is None else f"[{_fmt(interval[0], spec)}, {_fmt(interval[1], spec)}]"


def _seed_resamples(seeds, resamples, seed=0):
    """Bootstrap draws of the seeds (with replacement, each a list of len(seeds))."""
    rng = np.random.default_rng(seed)
    return [list(rng.choice(seeds, size=len(seeds))) for _ in range(resamples)]


def _loss_at(curve, step):
    """The eval loss at `step`, linearly interpolated between the evals around it."""
    previous = None
    for at, loss in curve:
        if loss is None or not math.isfinite(loss):
            return math.inf
        if at >= step:
            if previous is None or at == step:
                return loss
            (at0, loss0) = previous
            return loss0 + (loss - loss0) * (step - at0) / (at - at0)
        previous = (at, loss)
    return math.inf


def _mean_curve(curves):
    """The mean over seeds of eval curves with the same steps (inf where any is missing)."""
    out = []
    for points in zip(*curves):
        losses = [p[1] for p in points]
        ok = all(x is not None and math.isfinite(x) for x in losses)
        out.append([points[0][0], float(np.mean(losses)) if ok else math.inf])
    return out


def _vertex(xs, ys):
    """(x at the minimum, minimum, at_edge) of ys over xs (log-spaced: a parabola in log x
    through the best point and its neighbours; the best point itself at an edge)."""
    ys = [math.inf if y is None else y for y in ys]
    i = int(np.argmin(ys))
    if not math.isfinite(ys[i]):
        return None, None, True
    if i in (0, len(xs) - 1) or not (math.isfinite(ys[i - 1]) and math.isfinite(ys[i + 1])):
        return float(xs[i]), float(ys[i]), True
    lx = np.log(np.asarray(xs[i - 1:i + 2], float))
    c2, c1, c0 = np.polyfit(lx, ys[i - 1:i + 2], 2)
    if c2 <= 0:
        return float(xs[i]), float(ys[i]), False
    vertex = -c1 / (2 * c2)
    return float(math.exp(vertex)), float(c0 - c1 * c1 / (4 * c2)), False


def _ladder_section(ladder, note=""):
    lines = ["## The ladder", "",
             "Byte-level LM, one recipe (pre-norm, RMSNorm, RoPE, SwiGLU unless stated), "
             "seq_len 64. params: all (Chinchilla's N, with embeddings); non-embedding: "
             "Kaplan's N (`models.non_embedding_params`); FLOPs / token: training, "
             "`models.flops_per_token` (6 x matmul params + attention)." + note, "",
             "| size | d_model | layers | heads | d_ff | batch | params | non-embedding | "
             "FLOPs / token |", "|---|---|---|---|---|---|---|---|---|"]
    for row in ladder.values():
        lines.append(f"| {row['size']} | {row['d_model']} | {row['n_layers']} | "
                     f"{row['n_heads']} | {row['d_ff']} | {row['batch_size']} | "
                     f"{row['params']:,} | {row['non_embedding_params']:,} | "
                     f"{row['flops_per_token']:,} |")
    return lines


def _recipe_line(plan, recipe, lr_text):
    spec = optim.spec(plan.optimizer)
    fixed = ", ".join(f"{k}={v}" for k, v in spec.race_hparams.items())
    shape = ("linear warmup over the first {:.0%} of each run's steps, then a half cosine to "
             "0.1x at its last step" if recipe.schedule == "cosine" else
             "linear warmup over the first {:.0%} of each run's steps, then constant")
    return (f"Optimizer {plan.optimizer} (`optim.spec`: centre_lr {spec.centre_lr:g}"
            + (f", {fixed}" if fixed else "") + f"), {lr_text}; "
            + shape.format(recipe.warmup) + f"; {plan.seeds} seed(s) (initial params and "
            "data order); no gradient clipping.")


# ------------------------------------------------------------------------------ isoflop

def isoflop_runs(plan):
    """{(budget, size): [runs, one per seed]}, the (budget, size, steps) left out, the
    ladder rows. A size's steps at budget C are `round(C / C_min)` calls of its chunk, the
    steps of D = C_min / flops_per_token tokens: its program serves every budget."""
    p = plan.preset
    ladder = _ladder(p.sizes)
    lr = optim.spec(plan.optimizer).centre_lr * p.lr_factor
    smallest = min(p.budgets)
    cells, left_out = {}, []
    for budget in p.budgets:
        for size in p.sizes:
            row = ladder[size]
            chunk = max(1, round(smallest / row["flops_per_token"]
                                 / (row["batch_size"] * row["seq_len"])))
            steps = chunk * max(1, round(budget / smallest))
            if steps < p.min_steps:
                left_out.append((budget, size, steps))
                continue
            cells[budget, size] = [Run(Arm(size, row["batch_size"]), lr, seed, steps, chunk,
                                       steps) for seed in range(plan.seeds)]
    return cells, left_out, ladder


def _isoflop_recipe(plan):
    return Recipe(plan.optimizer, "cosine", plan.preset.warmup,
                  fast_compile=plan.preset.fast_compile)


def run_isoflop(plan, store, log=print) -> dict:
    """Trains (or reads back) the IsoFLOP runs and fits them; the results dict."""
    cells, left_out, ladder = isoflop_runs(plan)
    done = execute([r for runs in cells.values() for r in runs], _isoflop_recipe(plan), store,
                   plan.preset.lanes, log)
    return isoflop_results(plan, cells, left_out, ladder, done)


def isoflop_results(plan, cells, left_out, ladder, done) -> dict:
    """The fits of the IsoFLOP runs `cells` ({(budget, size): runs}) with results `done`."""
    p = plan.preset
    rows, records = [], []
    for (budget, size), runs in cells.items():
        results = [done[r] for r in runs]
        losses = [res["final_loss"] for res in results]
        first = results[0]
        rows.append({"flops": budget, "size": size, "params": first["params"],
                     "non_embedding_params": first["non_embedding_params"],
                     "flops_per_token": first["flops_per_token"],
                     "tokens": first["tokens"], "steps": runs[0].steps,
                     "losses": losses, "loss": _mean(losses)})
        records += [{"flops": budget, "size": size, "params": first["params"],
                     "non_embedding_params": first["non_embedding_params"],
                     "tokens": first["tokens"], "loss": loss, "seed": run.seed}
                    for run, loss in zip(runs, losses) if loss is not None]
    # Per budget the `window` sizes around the lowest mean loss: a parabola is a local model
    # of the profile, and the ladder spans more than one profile's bowl.
    windows = {}
    for budget in p.budgets:
        here = sorted((r for r in rows if r["flops"] == budget and r["loss"] is not None),
                      key=lambda r: r["params"])
        if not here:
            continue
        best = min(range(len(here)), key=lambda i: here[i]["loss"])
        start = min(max(0, best - p.window // 2), max(0, len(here) - p.window))
        windows[str(budget)] = [r["size"] for r in here[start:start + p.window]]
    fitted = [r for r in records if r["size"] in windows.get(str(r["flops"]), ())]
    fits = {}
    for convention, field in (("chinchilla", "params"), ("kaplan", "non_embedding_params")):
        recs = [{**r, "params": r[field]} for r in fitted]
        fits[convention] = _isoflop_fit(recs, p.resamples)
    try:
        surface = scaling.fit_loss_surface(records, num_starts=p.surface_starts)
        fits["surface"] = {"E": surface.E, "A": surface.A, "B": surface.B,
                           "alpha": surface.alpha, "beta": surface.beta, "a": surface.a,
                           "b": surface.b}
    except ValueError as error:
        fits["surface"] = {"error": _short(error)}
    return {"what": "isoflop", "ladder": ladder, "rows": rows, "windows": windows,
            "left_out": left_out, "fits": fits,
            "runs": [done[r] for runs in cells.values() for r in runs]}


def _isoflop_fit(records, resamples):
    try:
        fit = scaling.fit_isoflop(records)
    except ValueError as error:   # a profile without a minimum: no exponents to report
        return {"error": _short(error)}
    out = {"a": fit.a, "b": fit.b, "n_coefficient": fit.n_coefficient,
           "d_coefficient": fit.d_coefficient, "optima": [list(o) for o in fit.optima],
           "parabolas": {str(c): list(v) for c, v in fit.parabolas.items()},
           "min_losses": {str(c): v for c, v in fit.min_losses.items()},
           "extrapolated": list(fit.extrapolated)}
    try:
        interval = scaling.bootstrap_isoflop(records, num_resamples=resamples,
                                             confidence=CONFIDENCE, group_by="seed")
        out.update(a_interval=list(interval.a), b_interval=list(interval.b),
                   dropped=interval.dropped)
    except ValueError as error:
        out.update(a_interval=None, b_interval=None, interval_error=_short(error))
    return out


def render_isoflop(plan, results):
    p, fits = plan.preset, results["fits"]
    recipe = _isoflop_recipe(plan)
    lr = optim.spec(plan.optimizer).centre_lr * p.lr_factor
    lines = ["# IsoFLOP profiles (Chinchilla approaches 2 and 3)", "",
             f"Preset `{plan.preset_name}` ({p.about}). Budgets C: "
             + ", ".join(f"{c:.3g}" for c in p.budgets) + " training FLOPs; each size trains "
             "on D = C / (FLOPs per token) tokens (its steps at the smallest budget rounded, "
             "x C / C_min: the actual FLOPs 6ND-style, FLOPs per token x D, are in the "
             "table). " + _recipe_line(plan, recipe, f"lr {lr:.3g} at every size")
             + " Loss: the final eval loss (nats per byte) on 64 fixed held-out windows.", ""]
    lines += _ladder_section(results["ladder"])
    lines += ["", "## Runs", "",
              "Per budget and size: tokens D, steps, D/N and the final eval loss of each seed "
              "and their mean; * = in the budget's parabola fit (the "
              f"{p.window} sizes around its lowest mean loss).", "",
              "| C | size | N | D | steps | D/N | FLOPs / C | loss per seed | mean |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        mark = "*" if r["size"] in results["windows"].get(str(r["flops"]), ()) else ""
        lines.append(f"| {r['flops']:.3g} | {r['size']}{mark} | {r['params']:,} | "
                     f"{r['tokens']:,} | {r['steps']} | {r['tokens'] / r['params']:.1f} | "
                     f"{r['tokens'] * r['flops_per_token'] / r['flops']:.3f} | "
                     + " ".join(_fmt(x, ".4f") for x in r["losses"])
                     + f" | {_fmt(r['loss'], '.4f')} |")
    if results["left_out"]:
        lines += ["", "Left out (fewer than the preset's minimum steps): "
                  + "; ".join(f"C {c:.3g} / {s} ({n} steps)" for c, s, n in
                              results["left_out"]) + "."]
    lines += ["", "## Approach 2: optima per budget", "",
              "A parabola of loss in log N per budget (every seed's run a point); D_opt from "
              "the budget's own tokens-for-params line at N_opt.", ""]
    chin = fits["chinchilla"]
    if "error" in chin:
        lines.append(f"Not fitted: {chin['error']}")
        if "error" not in fits["kaplan"]:
            lines.append("")
        else:
            lines += ["", f"Without embeddings, not fitted either: {fits['kaplan']['error']}"]
    else:
        lines += ["| C | N_opt | D_opt | D_opt / N_opt | loss at N_opt | N_opt inside the "
                  "sizes fitted |", "|---|---|---|---|---|---|"]
        for c, n, d in chin["optima"]:
            inside = "no (extrapolated)" if c in chin["extrapolated"] else "yes"
            lines.append(f"| {c:.3g} | {n:,.0f} | {d:,.0f} | {d / n:.1f} | "
                         f"{chin['min_losses'][str(c)]:.4f} | {inside} |")
    lines += ["", "## Exponents", "",
              f"N_opt ~ C^a and D_opt ~ C^b; {CONFIDENCE:.0%} bootstrap intervals over seeds "
              f"(`scaling.bootstrap_isoflop`, {p.resamples} resamples of the seeds, each seed "
              "a full set of runs). Approach 3: L(N, D) = E + A / N^alpha + B / D^beta "
              "(Huber loss on log L, as Chinchilla) on every run, a = beta / (alpha + beta), "
              "b = alpha / (alpha + beta).", "",
              "| fit | a | b |", "|---|---|---|"]
    for convention, label in (("chinchilla", "approach 2, N with embeddings"),
                              ("kaplan", "approach 2, N without embeddings")):
        fit = fits[convention]
        if "error" in fit:
            lines.append(f"| {label} | not fitted (see above) | |")
        else:
            lines.append(f"| {label} | {fit['a']:.3f} {_fmt_interval(fit['a_interval'])} | "
                         f"{fit['b']:.3f} {_fmt_interval(fit['b_interval'])} |")
    surface = fits["surface"]
    if "error" in surface:
        lines.append(f"| approach 3 | not fitted | {surface['error']} |")
    else:
        lines.append(f"| approach 3 (E {surface['E']:.3g}, A {surface['A']:.3g}, B "
                     f"{surface['B']:.3g}, alpha {surface['alpha']:.3g}, beta "
                     f"{surface['beta']:.3g}) | {surface['a']:.3f} | {surface['b']:.3f} |")
    for name, a, b in PUBLISHED:
        lines.append(f"| {name} (published) | {a} | {b} |")
    if "error" not in chin and "error" not in surface:
        lines += ["", f"Approach 3's a - approach 2's a: {surface['a'] - chin['a']:+.3f}."]
    if "error" not in chin and chin.get("dropped"):
        lines += ["", f"{chin['dropped']} of {p.resamples} bootstrap resamples dropped (a "
                  "profile with fewer than 3 sizes or no minimum)."]
    return lines


def plot_isoflop(plan, results, path):
    """Chinchilla's Figure 3: loss against N per budget with its parabola; N_opt and D_opt
    against C with the power laws."""
    fig = Figure(figsize=(15, 4.4))
    ax_loss, ax_n, ax_d = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    budgets = sorted({r["flops"] for r in results["rows"]})
    colors = dict(zip(budgets, _colors(len(budgets))))
    chin = results["fits"]["chinchilla"]
    for c in budgets:
        rows = sorted((r for r in results["rows"] if r["flops"] == c), key=lambda r: r["params"])
        xs = [r["params"] for r in rows]
        ax_loss.plot(xs, [math.nan if r["loss"] is None else r["loss"] for r in rows], "o",
                     color=colors[c], label=f"C = {c:.2g}")
        for r in rows:
            ax_loss.plot([r["params"]] * len(r["losses"]),
                         [math.nan if x is None else x for x in r["losses"]], ".",
                         color=colors[c], alpha=0.35)
        if "error" not in chin and str(c) in chin["parabolas"]:
            c2, c1, c0 = chin["parabolas"][str(c)]
            fitted = [r["params"] for r in rows
                      if r["size"] in results["windows"].get(str(c), ())]
            grid = np.exp(np.linspace(math.log(min(fitted)), math.log(max(fitted)), 100))
            ax_loss.plot(grid, c2 * np.log(grid) ** 2 + c1 * np.log(grid) + c0, "-",
                         color=colors[c], alpha=0.8)
            n_opt = next(n for cc, n, _ in chin["optima"] if cc == c)
            ax_loss.plot([n_opt], [chin["min_losses"][str(c)]], "*", color=colors[c],
                         markersize=12, markeredgecolor="black")
    ax_loss.set_xscale("log")
    ax_loss.set_xlabel("parameters N (with embeddings)")
    ax_loss.set_ylabel("final eval loss (nats / byte)")
    ax_loss.set_title("IsoFLOP profiles")
    ax_loss.legend(fontsize=8)
    for ax, index, coefficient, exponent, interval, label in (
            (ax_n, 1, "n_coefficient", "a", "a_interval", "N_opt"),
            (ax_d, 2, "d_coefficient", "b", "b_interval", "D_opt")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute budget C (FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        if "error" in chin:
            ax.set_title(f"{label}: not fitted")
            continue
        cs = [o[0] for o in chin["optima"]]
        ax.plot(cs, [o[index] for o in chin["optima"]], "o", color="black")
        for c, o in zip(cs, chin["optima"]):
            ax.plot([c], [o[index]], "o", color=colors[c])
        grid = np.exp(np.linspace(math.log(min(cs) / 2), math.log(max(cs) * 2), 50))
        ax.plot(grid, chin[coefficient] * grid ** chin[exponent], "--", color="gray")
        ax.set_title(f"{label} ~ C^{chin[exponent]:.2f} "
                     f"{_fmt_interval(chin[interval], '.2f')}")
    fig.subplots_adjust(left=0.05, right=0.98, wspace=0.28, bottom=0.12)
    fig.savefig(path, dpi=100)


def _colors(n):
    """n colours of matplotlib's viridis, dark to light."""
    from matplotlib import colormaps
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.85, max(n, 1))]


# ---------------------------------------------------------------------------------- ffn

def _ffn_arm(size, variant):
    """The rung with `variant`'s MLP: d_ff = 4 d_model, 2/3 of it for the gated ones."""
    row = workloads.LM_LADDER[size]
    d_ff = 4 * row["d_model"]
    if variant in GATED_MLPS:
        d_ff = d_ff * 2 // 3
    return Arm(size, row["batch_size"], mlp=variant, d_ff=d_ff)


def _ffn_recipe(plan):
    return Recipe(plan.optimizer, "cosine", plan.preset.warmup,
                  fast_compile=plan.preset.fast_compile)


def run_ffn(plan, store, log=print) -> dict:
    """Trains (or reads back) every FFN variant x seed at equal params and tokens."""
    p = plan.preset
    recipe = _ffn_recipe(plan)
    lr = optim.spec(plan.optimizer).centre_lr * p.lr_factor
    arms = {v: _ffn_arm(p.size, v) for v in MLPS}
    params = {v: _params(arm) for v, arm in arms.items()}
    seq_len = workloads.LM_LADDER[p.size]["seq_len"]
    steps = _steps(p.tokens_per_param * params["relu"], arms["relu"].batch_size, seq_len,
                   p.calls)
    runs = {v: [Run(arm, lr, seed, steps, steps // p.calls, steps)
                for seed in range(plan.seeds)] for v, arm in arms.items()}
    done = execute([r for rs in runs.values() for r in rs], recipe, store, p.lanes, log)
    rows = []
    base = [done[r]["final_loss"] for r in runs["relu"]]
    for v, rs in runs.items():
        losses = [done[r]["final_loss"] for r in rs]
        mean, half, n = race_stats.mean_ci(losses, CONFIDENCE)
        rows.append({"variant": v, "d_ff": arms[v].d_ff, "params": params[v],
                     "losses": losses, "mean": _finite(mean), "half": _finite(half), "n": n,
                     "diverged": sum(done[r]["diverged"] for r in rs),
                     "p_vs_relu": (None if v == "relu" else _finite(race_stats.paired_p_value(
                         [math.nan if x is None else x for x in losses],
                         [math.nan if x is None else x for x in base])))})
    first = done[runs["relu"][0]]
    return {"what": "ffn", "ladder": _ladder([p.size]), "rows": rows, "steps": steps,
            "tokens": first["tokens"], "lr": lr,
            "runs": [done[r] for rs in runs.values() for r in rs]}


def render_ffn(plan, results):
    p = plan.preset
    row = workloads.LM_LADDER[p.size]
    lines = ["# Feed-forward variants (Shazeer 2020, GLU Variants Improve Transformer)", "",
             f"Preset `{plan.preset_name}` ({p.about}). The `{p.size}` rung (d_model "
             f"{row['d_model']}, {row['n_layers']} layer(s), {row['n_heads']} head(s)) with "
             "each `TransformerConfig(mlp=...)`: d_ff = 4 d_model for relu, gelu and swish "
             "(2 matrices), 2/3 of it for the gated glu, bilinear, geglu, swiglu and reglu (3 "
             "matrices), so the params are equal; every variant trains on "
             f"{results['tokens']:,} tokens ({results['steps']} steps of "
             f"{row['batch_size']} x {row['seq_len']}). "
             + _recipe_line(plan, _ffn_recipe(plan), f"lr {results['lr']:.3g}")
             + " Loss: the final eval loss (nats per byte) on 64 fixed held-out windows.", "",
             "## Table 1, at this scale", "",
             f"Mean over seeds +/- the {CONFIDENCE:.0%} Student-t half width (n seeds); p: "
             "paired t-test against ReLU over seeds (they share the data order). Shazeer's "
             "column: log-perplexity on C4 after 65,536 steps (each +/- 0.003 to 0.010), "
             "not comparable in level, only in ranking.", "",
             f"| | params | d_ff | eval loss ({results['steps']} steps) | per seed | p vs ReLU | "
             "Shazeer 2020 (65,536 steps) |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        loss = (f"{_fmt(r['mean'], '.4f')} +/- {_fmt(r['half'], '.4f')} ({r['n']})"
                + (f", {r['diverged']} diverged" if r["diverged"] else ""))
        lines.append(f"| {FFN_NAMES[r['variant']]} | {r['params']:,} | {r['d_ff']} | {loss} | "
                     + " ".join(_fmt(x, ".4f") for x in r["losses"])
                     + f" | {_fmt(r['p_vs_relu'], '.2g')} | {SHAZEER_65K[r['variant']]:.3f} |")
    ranked = [r["variant"] for r in sorted(results["rows"], key=lambda r: (
        math.inf if r["mean"] is None else r["mean"]))]
    published = sorted(SHAZEER_65K, key=SHAZEER_65K.get)
    lines += ["", "Ranking here (best first): " + ", ".join(FFN_NAMES[v] for v in ranked)
              + ". Shazeer's: " + ", ".join(FFN_NAMES[v] for v in published) + "."]
    gated = [r["mean"] for r in results["rows"] if r["variant"] in
             GATED_MLPS and r["mean"] is not None]
    plain = [r["mean"] for r in results["rows"] if r["variant"] not in
             GATED_MLPS and r["mean"] is not None]
    if gated and plain:
        lines += ["", f"Mean of the gated variants {np.mean(gated):.4f}, of the others "
                  f"{np.mean(plain):.4f} (Shazeer: 1.956 against 1.991)."]
    return lines


def plot_ffn(plan, results, path):
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    rows = results["rows"]
    for i, r in enumerate(rows):
        gated = r["variant"] in GATED_MLPS
        ax.errorbar([math.nan if r["mean"] is None else r["mean"]], [i],
                    xerr=[[0 if r["half"] is None else r["half"]]], fmt="o",
                    color="tab:blue" if gated else "tab:gray", capsize=3)
        ax.plot([x for x in r["losses"] if x is not None],
                [i] * len([x for x in r["losses"] if x is not None]), ".", color="black",
                alpha=0.4)
    ax.set_yticks(range(len(rows)), [FFN_NAMES[r["variant"]] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"final eval loss (nats / byte), mean +/- {CONFIDENCE:.0%} interval")
    ax.set_title(f"FFN variants at equal params ({rows[0]['params']:,}) and tokens")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.2, right=0.97)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------- critical batch

def _critical_batch_recipe(plan):
    return Recipe(plan.optimizer, "constant", plan.preset.warmup, gns=True,
                  fast_compile=plan.preset.fast_compile)


def critical_batch_runs(plan):
    """(settings, {(size, batch, lr factor): runs}, ladder rows). A setting is a (size, D)
    point of the model axis (every size at the middle data size) or the data axis (the
    reference size at every data size); the runs of a size reach its largest D at the
    smallest batch B0, and min(B / B0, overshoot) x that at batch B, in `evals` calls."""
    p = plan.preset
    ladder = _ladder(tuple(dict.fromkeys((*p.sizes, p.reference))))
    data = [f * ladder[p.reference]["params"] for f in p.data]
    middle = data[len(data) // 2]
    settings = ([{"axis": "model", "size": size, "tokens": middle} for size in p.sizes]
                + [{"axis": "data", "size": p.reference, "tokens": d} for d in data])
    horizon = {}
    for setting in settings:
        horizon[setting["size"]] = max(horizon.get(setting["size"], 0), setting["tokens"])
    smallest, centre = min(p.batch_sizes), optim.spec(plan.optimizer).centre_lr
    runs = {}
    for size, tokens in horizon.items():
        seq_len = ladder[size]["seq_len"]
        for batch in p.batch_sizes:
            # Steps to a target never grow with the batch size (S(B) falls to S_min), so a
            # batch B trains at most the smallest batch's steps, and at most `overshoot` x
            # its tokens.
            need = tokens * min(batch / smallest, p.overshoot)
            chunk = max(1, math.ceil(need / (batch * seq_len) / p.evals))
            for factor in p.lr_factors:
                lr = centre * factor * math.sqrt(batch / LR_REFERENCE_BATCH)
                runs[size, batch, factor] = [
                    Run(Arm(size, batch), lr, seed, chunk * p.evals, chunk, chunk)
                    for seed in range(plan.seeds)]
    return settings, runs, ladder


def _steps_to_targets(plan, settings, runs, ladder, done, sample):
    """Per setting (the seeds of `sample`, repeats allowed, averaged per eval): its target
    (the smallest batch's best loss after D tokens) and per batch size the fewest steps to
    it over the lr grid (None: missed) and that lr's factor."""
    p = plan.preset
    smallest = min(p.batch_sizes)
    out = []
    for setting in settings:
        size = setting["size"]
        curves = {(b, f): _mean_curve([done[runs[size, b, f][seed]]["curve"]
                                       for seed in sample])
                  for b in p.batch_sizes for f in p.lr_factors}
        at = setting["tokens"] / (smallest * ladder[size]["seq_len"])
        target = min(_loss_at(curves[smallest, f], at) for f in p.lr_factors)
        steps, factors = {}, {}
        for b in p.batch_sizes:
            reached = [(race_stats.steps_to_target(curves[b, f], target), f)
                       for f in p.lr_factors] if math.isfinite(target) else []
            reached = [(s, f) for s, f in reached if s is not None]
            steps[b], factors[b] = min(reached) if reached else (None, None)
        out.append({"target": target if math.isfinite(target) else None, "steps": steps,
                    "lr_factor": factors})
    return out


def _batch_fits(points):
    """McCandlish's and Zhang's critical batch of {batch: steps} (None where missed)."""
    reached = sorted((b, s) for b, s in points.items() if s is not None and s > 0)
    if len(reached) < 3:
        return {"s_min": None, "b_crit": None, "zhang": None}
    batches, steps = zip(*reached)
    s_min, b_crit = scaling.fit_critical_batch(batches, steps)
    zhang = scaling.critical_batch_zhang(batches, steps)
    return {"s_min": _finite(s_min), "b_crit": _finite(b_crit), "zhang": _finite(zhang)}


def _axis_exponents(settings, fits, ladder):
    """B_crit ~ N^x over the model axis and ~ D^y over the data axis (None if not fitted)."""
    out = {}
    for axis, x_of in (("model", lambda s: ladder[s["size"]]["params"]),
                       ("data", lambda s: s["tokens"])):
        xs = [(x_of(s), f["b_crit"]) for s, f in zip(settings, fits) if s["axis"] == axis]
        ok = [(x, b) for x, b in xs if b is not None and b > 0]
        out[axis] = (scaling.fit_power_law(*zip(*ok))[1]
                     if len(ok) == len(xs) and len({x for x, _ in ok}) >= 2 else None)
    return out


def run_critical_batch(plan, store, log=print) -> dict:
    """Trains (or reads back) the batch-size sweeps; steps to targets, fits, noise scale."""
    p = plan.preset
    settings, runs, ladder = critical_batch_runs(plan)
    done = execute([r for rs in runs.values() for r in rs], _critical_batch_recipe(plan),
                   store, p.lanes, log)
    seeds = list(range(plan.seeds))
    table = _steps_to_targets(plan, settings, runs, ladder, done, seeds)
    fits = [_batch_fits(row["steps"]) for row in table]
    exponents = _axis_exponents(settings, fits, ladder)
    draws = {"b_crit": [[] for _ in settings], "s_min": [[] for _ in settings],
             "zhang": [[] for _ in settings], "model": [], "data": []}
    for sample in _seed_resamples(seeds, p.resamples):
        sample_fits = [_batch_fits(row["steps"]) for row in
                       _steps_to_targets(plan, settings, runs, ladder, done, sample)]
        for i, fit in enumerate(sample_fits):
            for key in ("b_crit", "s_min", "zhang"):
                draws[key][i].append(math.inf if fit[key] is None else fit[key])
        for axis, value in _axis_exponents(settings, sample_fits, ladder).items():
            draws[axis].append(math.nan if value is None else value)
    rows = []
    for i, (setting, row, fit) in enumerate(zip(settings, table, fits)):
        rows.append({**setting, "params": ladder[setting["size"]]["params"], **row, **fit,
                     **{f"{key}_interval": _interval(draws[key][i])
                        for key in ("b_crit", "s_min", "zhang")},
                     "noise_scale": _noise_scale_at_target(plan, setting, row, runs, done)})
    return {"what": "critical_batch", "ladder": ladder, "rows": rows,
            "exponents": {axis: {"value": exponents[axis],
                                 "interval": _interval(draws[axis])}
                          for axis in ("model", "data")},
            "runs": [done[r] for rs in runs.values() for r in rs]}


def _noise_scale_at_target(plan, setting, row, runs, done):
    """B_simple where the runs cross the target: per batch size (best lr, every seed) the
    two-batch estimates of tr(Sigma) and |G|^2 of the call ending at or after the crossing
    (`optim.diagnostics.gradient_noise_scale_from_norms`), averaged over batch sizes."""
    traces, norms = [], []
    for batch, steps in row["steps"].items():
        if steps is None:
            continue
        small, big = [], []
        for run in runs[setting["size"], batch, row["lr_factor"][batch]]:
            point = next((g for g in done[run]["gns"] if g[0] >= steps), None)
            if point is not None and None not in point:
                small.append(point[1])
                big.append(point[2])
        if small:
            estimate = optim.diagnostics.gradient_noise_scale_from_norms(
                np.asarray(small), np.asarray(big), batch // 2, batch)
            traces.append(float(estimate.trace_covariance))
            norms.append(float(estimate.grad_norm_sq))
    if not traces or np.mean(norms) <= 0:
        return None
    return float(np.mean(traces) / np.mean(norms))


def _verdict(exponents):
    model, data = exponents["model"], exponents["data"]
    if model["interval"] is None or data["interval"] is None:
        return "Not enough fitted settings to compare the two dependencies."
    if data["interval"][0] > model["interval"][1]:
        return ("At this scale B_crit grows more with the data size than with the model size "
                "(the intervals do not overlap), as Zhang et al. 2024 find.")
    if model["interval"][0] > data["interval"][1]:
        return ("At this scale B_crit grows more with the model size than with the data size "
                "(the intervals do not overlap), unlike Zhang et al. 2024.")
    return ("At this scale the two exponents' intervals overlap: these runs cannot tell "
            "whether B_crit follows the data size (Zhang et al. 2024) or the model size.")


def render_critical_batch(plan, results):
    p = plan.preset
    batches = p.batch_sizes
    lines = ["# Critical batch size against model size and data size", "",
             f"Preset `{plan.preset_name}` ({p.about}). Batch sizes in rows of 64 tokens: "
             + ", ".join(map(str, batches)) + ". "
             + _recipe_line(plan, _critical_batch_recipe(plan),
                            "lr = centre_lr x f x sqrt(B / 16) with f in "
                            + ", ".join(f"{f:g}" for f in p.lr_factors)
                            + ", the best f per batch size and target")
             + " A run at the smallest batch B0 trains on the largest D of its size, one at B "
             f"on min(B / B0, {p.overshoot:g}) x that (never more steps than B0); "
             f"{p.evals} evaluations per run (eval loss on 64 "
             "fixed held-out windows, averaged over seeds), crossings interpolated between "
             "them. Target of a setting (N, D): the smallest batch's loss after D tokens "
             "(its best lr).", ""]
    lines += _ladder_section(results["ladder"])
    lines += ["", "## Steps to the target", "",
              "Steps (the lr factor f that reached it first); - = missed within the run.", "",
              "| axis | size | N | D (tokens) | target | " + " | ".join(f"B={b}" for b in batches)
              + " |", "|---|---|---|---|---|" + "---|" * len(batches)]
    for r in results["rows"]:
        cells = [("-" if r["steps"][b] is None else
                  f"{r['steps'][b]:.0f} (f {r['lr_factor'][b]:g})") for b in batches]
        lines.append(f"| {r['axis']} | {r['size']} | {r['params']:,} | {r['tokens']:,.0f} | "
                     f"{_fmt(r['target'], '.4f')} | " + " | ".join(cells) + " |")
    lines += ["", "## Critical batch size", "",
              "S(B) = S_min (1 + B_crit / B) fitted per setting (`scaling.fit_critical_batch`); "
              "B* (Zhang et al.): where the steps exceed the perfect-scaling line through the "
              "smallest batch by 20% (`scaling.critical_batch_zhang`); "
              f"{CONFIDENCE:.0%} bootstrap intervals over seeds ({p.resamples} resamples). "
              "B_simple: the gradient noise scale tr(Sigma) / |G|^2 (McCandlish et al.) in "
              "rows, estimated from each step's two half batches in the evaluation interval "
              "where the runs cross the target.", "",
              "| axis | size | D | S_min | B_crit | B* (Zhang) | B_simple |",
              "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['axis']} | {r['size']} | {r['tokens']:,.0f} | "
                     f"{_fmt(r['s_min'], '.4g')} {_fmt_interval(r['s_min_interval'])} | "
                     f"{_fmt(r['b_crit'], '.3g')} {_fmt_interval(r['b_crit_interval'])} | "
                     f"{_fmt(r['zhang'], '.3g')} {_fmt_interval(r['zhang_interval'])} | "
                     f"{_fmt(r['noise_scale'], '.3g')} |")
    ex = results["exponents"]
    lines += ["", "## Model size or data size?", "",
              "B_crit ~ N^x over the model axis (fixed D) and ~ D^y over the data axis (fixed "
              "N), `scaling.fit_power_law`, with bootstrap intervals over seeds.", "",
              f"- x (model size): {_fmt(ex['model']['value'], '.3f')} "
              f"{_fmt_interval(ex['model']['interval'])}",
              f"- y (data size): {_fmt(ex['data']['value'], '.3f')} "
              f"{_fmt_interval(ex['data']['interval'])}", "", _verdict(ex)]
    return lines


def plot_critical_batch(plan, results, path):
    """Steps to the target against batch size per setting, the perfect-scaling line through
    the smallest batch (dotted) and the fitted S_min (1 + B_crit / B) (solid)."""
    fig = Figure(figsize=(11, 4.4))
    for k, axis in enumerate(("model", "data")):
        ax = fig.add_subplot(1, 2, k + 1)
        rows = [r for r in results["rows"] if r["axis"] == axis]
        for r, color in zip(rows, _colors(len(rows))):
            points = sorted((b, s) for b, s in r["steps"].items() if s is not None)
            label = (f"{r['size']}" if axis == "model" else f"D = {r['tokens']:,.0f}")
            if not points:
                continue
            b, st = zip(*points)
            ax.plot(b, st, "o", color=color, label=f"{label}, B_crit {_fmt(r['b_crit'], '.3g')}")
            grid = np.geomspace(min(b), max(plan.preset.batch_sizes), 50)
            ax.plot(grid, st[0] * b[0] / grid, ":", color=color)
            if r["b_crit"] is not None:
                ax.plot(grid, r["s_min"] * (1 + r["b_crit"] / grid), "-", color=color,
                        alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (rows of 64 tokens)")
        ax.set_ylabel("steps to the target loss")
        ax.set_title("model axis (fixed D)" if axis == "model" else "data axis (fixed N)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.98, wspace=0.25, bottom=0.12)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- lr_batch

def _lr_batch_recipe(plan):
    return Recipe(plan.optimizer, "cosine", plan.preset.warmup,
                  fast_compile=plan.preset.fast_compile)


def _width_arm(size, batch, **mup):
    """The rung at `batch` with d_ff = 4 d_model (the MLP grows with the width, as muP
    assumes)."""
    return Arm(size, batch, d_ff=4 * workloads.LM_LADDER[size]["d_model"], **mup)


def _sized_runs(plan, arm, lr):
    p = plan.preset
    steps = _steps(p.tokens_per_param * _params(arm), arm.batch_size,
                   workloads.LM_LADDER[arm.size]["seq_len"], p.calls)
    return [Run(arm, lr, seed, steps, steps // p.calls, steps) for seed in range(plan.seeds)]


def _lr_optima(plan, runs, done, sample):
    """Per (size, batch): (lr_opt, loss, at the grid's edge); per size: (B_opt, loss, edge);
    the power laws of lr_opt (at the reference batch) and B_opt in N."""
    p = plan.preset
    centre = optim.spec(plan.optimizer).centre_lr
    lrs = [centre * f for f in p.lr_factors]
    # a diverged seed (no final loss) makes its lr's mean inf: that lr is not an optimum
    mean = {key: math.inf if any(done[rs[seed]]["final_loss"] is None for seed in sample)
            else float(np.mean([done[rs[seed]]["final_loss"] for seed in sample]))
            for key, rs in runs.items()}
    lr_opt = {(size, b): _vertex(lrs, [mean[size, b, f] for f in p.lr_factors])
              for size in p.sizes for b in p.batch_sizes}
    b_opt = {size: _vertex(p.batch_sizes, [lr_opt[size, b][1] for b in p.batch_sizes])
             for size in p.sizes}
    params = [_params(_width_arm(size, p.reference_batch)) for size in p.sizes]
    laws = {}
    # An optimum at the grid's edge is a bound, not a value: no law is fitted through one.
    for name, optima in (("lr", [lr_opt[s, p.reference_batch] for s in p.sizes]),
                         ("batch", [b_opt[s] for s in p.sizes])):
        laws[name] = (scaling.fit_power_law(params, [value for value, _, _ in optima])
                      if all(value is not None and not edge for value, _, edge in optima)
                      else (None, None))
    return mean, lr_opt, b_opt, laws


def run_lr_batch(plan, store, log=print) -> dict:
    """The lr x batch sweep per width, the optima and their laws, then the transfer runs."""
    p = plan.preset
    recipe = _lr_batch_recipe(plan)
    centre = optim.spec(plan.optimizer).centre_lr
    sweep = {(size, b, f): _sized_runs(plan, _width_arm(size, b), centre * f)
             for size in p.sizes for b in p.batch_sizes for f in p.lr_factors}
    done = execute([r for rs in sweep.values() for r in rs], recipe, store, p.lanes, log)
    seeds = list(range(plan.seeds))
    mean, lr_opt, b_opt, laws = _lr_optima(plan, sweep, done, seeds)
    draws = {"lr": [], "batch": [], **{size: [] for size in p.sizes}}
    for sample in _seed_resamples(seeds, p.resamples):
        _, sample_opt, _, sample_laws = _lr_optima(plan, sweep, done, sample)
        for name in ("lr", "batch"):
            draws[name].append(math.nan if sample_laws[name][1] is None
                               else sample_laws[name][1])
        for size in p.sizes:
            value = sample_opt[size, p.reference_batch][0]
            draws[size].append(math.nan if value is None else value)
    # The transfer: from the narrowest width's optimum to the wider ones.
    base = p.sizes[0]
    w0 = workloads.LM_LADDER[base]["d_model"]
    lr0 = lr_opt[base, p.reference_batch][0]
    transfer = {}
    if lr0 is not None:
        for size in p.sizes[1:]:
            w = workloads.LM_LADDER[size]["d_model"]
            transfer[size] = {
                "rule": _sized_runs(plan, _width_arm(size, p.reference_batch), lr0 * w0 / w),
                "mup": _sized_runs(plan, _width_arm(size, p.reference_batch,
                                                    parametrization="mup", base_width=w0),
                                   lr0)}
        done.update(execute([r for t in transfer.values() for rs in t.values() for r in rs],
                            recipe, store, p.lanes, log))
    rows = []
    for size in p.sizes:
        row = {"size": size, "width": workloads.LM_LADDER[size]["d_model"],
               "params": _params(_width_arm(size, p.reference_batch)),
               "losses": {str(b): [mean[size, b, f] for f in p.lr_factors]
                          for b in p.batch_sizes},
               "lr_opt": {str(b): list(lr_opt[size, b]) for b in p.batch_sizes},
               "lr_opt_interval": _interval(draws[size]), "b_opt": list(b_opt[size])}
        for kind, rs in transfer.get(size, {}).items():
            row[kind] = {"lr": rs[0].lr, "loss": _mean([done[r]["final_loss"] for r in rs]),
                         "losses": [done[r]["final_loss"] for r in rs]}
        rows.append(row)
    return {"what": "lr_batch", "ladder": _ladder(p.sizes), "rows": rows, "base_lr": lr0,
            "reference_batch": p.reference_batch,
            "lrs": [centre * f for f in p.lr_factors],
            "laws": {name: {"coefficient": laws[name][0], "exponent": laws[name][1],
                            "interval": _interval(draws[name])} for name in ("lr", "batch")},
            "runs": [done[r] for r in dict.fromkeys(
                [r for rs in sweep.values() for r in rs]
                + [r for t in transfer.values() for rs in t.values() for r in rs])]}


def _law_text(law, results, name):
    """`N^exponent [interval]`, or why it was not fitted (an optimum at a grid edge)."""
    if law["exponent"] is not None:
        return f"N^{_fmt(law['exponent'], '.3f')} {_fmt_interval(law['interval'])}"
    ref = str(results["reference_batch"])
    edges = [r["size"] for r in results["rows"]
             if (r["lr_opt"][ref] if name == "lr" else r["b_opt"])[2]]
    return ("N^? (not fitted: the optimum is at the grid's edge at " + ", ".join(edges)
            + ", so only a bound is known there)")


def render_lr_batch(plan, results):
    p = plan.preset
    ref = str(p.reference_batch)
    lines = ["# Learning-rate and batch-size laws, lr transfer across width", "",
             f"Preset `{plan.preset_name}` ({p.about}). The ladder's rungs "
             + ", ".join(p.sizes) + " with d_ff = 4 d_model (so the MLP widens with d_model, "
             "as muP assumes; params below are with that d_ff); every run trains on "
             f"{p.tokens_per_param:g} tokens per parameter. "
             + _recipe_line(plan, _lr_batch_recipe(plan), "lr = centre_lr x "
                            + ", ".join(f"{f:g}" for f in p.lr_factors))
             + " Loss: the final eval loss, mean over seeds.", ""]
    lines += _ladder_section(results["ladder"], " (d_ff here: the rung's default, not the "
                             "4 d_model used by this study)")
    lines += ["", f"## Loss against lr (batch {p.reference_batch})", "",
              "| size | width | N | " + " | ".join(f"{lr:.3g}" for lr in results["lrs"])
              + " |", "|---|---|---|" + "---|" * len(results["lrs"])]
    for r in results["rows"]:
        lines.append(f"| {r['size']} | {r['width']} | {r['params']:,} | "
                     + " | ".join(_fmt(x, ".4f") for x in r["losses"][ref]) + " |")
    lines += ["", "## Optima", "",
              "lr_opt: a parabola in log lr through the grid's best lr and its neighbours "
              "(edge: the best is at the grid's edge, so the optimum may lie beyond); B_opt: "
              f"the same in log B over the best loss of each batch size; {CONFIDENCE:.0%} "
              f"bootstrap intervals over seeds ({p.resamples} resamples).", "",
              "| size | " + " | ".join(f"lr_opt (B={b})" for b in p.batch_sizes)
              + f" | interval (B={p.reference_batch}) | B_opt |",
              "|---|" + "---|" * (len(p.batch_sizes) + 2)]
    for r in results["rows"]:
        cells = [f"{_fmt(v[0], '.3g')}{' (edge)' if v[2] else ''}"
                 for v in (r["lr_opt"][str(b)] for b in p.batch_sizes)]
        b_opt, _, edge = r["b_opt"]
        lines.append(f"| {r['size']} | " + " | ".join(cells)
                     + f" | {_fmt_interval(r['lr_opt_interval'])} | {_fmt(b_opt, '.3g')}"
                     + (" (edge)" if edge else "") + " |")
    laws = results["laws"]
    lines += ["", "Power laws in N (params with d_ff = 4 d_model): "
              f"lr_opt ~ {_law_text(laws['lr'], results, 'lr')} (at batch "
              f"{p.reference_batch}); B_opt ~ {_law_text(laws['batch'], results, 'batch')}. "
              "Published: DeepSeek LLM (2024) fit "
              "lr_opt ~ C^-0.125 and B_opt ~ C^0.327 in compute; with the lr scaling as "
              "1/width and width ~ N^(1/2), lr_opt ~ N^-0.5.", "",
              "## Transfer from the narrowest width", "",
              f"From `{p.sizes[0]}`'s optimal lr {_fmt(results['base_lr'], '.3g')} (batch "
              f"{p.reference_batch}): the seed's rule trains each wider size in SP at lr x "
              "w_small / w; muP (`parametrization=\"mup\"`, base_width = the narrowest width, "
              "hidden matrices' lr x base_width / w by `models.mup_lr_multipliers`) at the "
              "same lr; the measured optimum is the SP sweep's.", "",
              "| size | width | measured lr_opt | best swept loss | rule lr (/ lr_opt) | loss "
              "(SP, rule) | muP lr | loss (muP) |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"][1:]:
        lr_opt, _, edge = r["lr_opt"][ref]
        best = min((x for x in r["losses"][ref] if x is not None), default=None)
        rule, mup = r.get("rule"), r.get("mup")
        if rule is None:
            lines.append(f"| {r['size']} | {r['width']} | not run (no optimum at the "
                         "narrowest width) | | | | | |")
            continue
        ratio = rule["lr"] / lr_opt if lr_opt else None
        lines.append(f"| {r['size']} | {r['width']} | {_fmt(lr_opt, '.3g')}"
                     f"{' (edge)' if edge else ''} | {_fmt(best, '.4f')} | "
                     f"{rule['lr']:.3g} ({_fmt(ratio, '.2f')}x) | {_fmt(rule['loss'], '.4f')} | "
                     f"{mup['lr']:.3g} | {_fmt(mup['loss'], '.4f')} |")
    return lines


def plot_lr_batch(plan, results, path):
    """Loss against lr per width (rule and muP runs marked), lr_opt and B_opt against N."""
    p = plan.preset
    ref = str(p.reference_batch)
    fig = Figure(figsize=(15, 4.4))
    ax = fig.add_subplot(1, 3, 1)
    for r, color in zip(results["rows"], _colors(len(results["rows"]))):
        ax.plot(results["lrs"], [math.nan if x is None or not math.isfinite(x) else x
                                 for x in r["losses"][ref]], "o-", color=color,
                label=f"{r['size']} (w {r['width']})")
        for kind, marker in (("rule", "x"), ("mup", "s")):
            if kind in r and r[kind]["loss"] is not None:
                ax.plot([r[kind]["lr"]], [r[kind]["loss"]], marker, color=color,
                        markersize=9, markerfacecolor="none" if kind == "mup" else None)
    ax.set_xscale("log")
    ax.set_xlabel("peak lr")
    ax.set_ylabel("final eval loss (nats / byte)")
    ax.set_title(f"batch {p.reference_batch}: x = 1/width rule, square = muP")
    ax.legend(fontsize=8)
    params = [r["params"] for r in results["rows"]]
    for k, (name, values, label) in enumerate((
            ("lr", [r["lr_opt"][ref][0] for r in results["rows"]], "lr_opt"),
            ("batch", [r["b_opt"][0] for r in results["rows"]], "B_opt (rows)"))):
        ax = fig.add_subplot(1, 3, k + 2)
        ax.plot(params, [math.nan if v is None else v for v in values], "o", color="black")
        law = results["laws"][name]
        if law["exponent"] is not None:
            grid = np.geomspace(min(params), max(params), 20)
            ax.plot(grid, law["coefficient"] * grid ** law["exponent"], "--", color="gray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        finite = [v for v in values if v is not None]
        if finite and max(finite) < 1.01 * min(finite):   # one value (a grid edge): show it
            ax.set_ylim(min(finite) / 2, min(finite) * 2)
        ax.set_xlabel("parameters N")
        ax.set_ylabel(label)
        ax.set_title(f"{label} ~ N^{_fmt(law['exponent'], '.2f')} "
                     f"{_fmt_interval(law['interval'], '.2f')}")
        ax.grid(alpha=0.3, which="both")
    fig.subplots_adjust(left=0.05, right=0.98, wspace=0.28, bottom=0.12)
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------ speedup

def _speedup_recipe(plan, optimizer):
    return Recipe(optimizer, "cosine", plan.preset.warmup, fast_compile=plan.preset.fast_compile)


def _speedup_arm(plan, size):
    """The rung with d_ff = 4 d_model in muP, base_width the narrowest size's width (where
    muP is the same model as SP)."""
    p = plan.preset
    return _width_arm(size, p.batch_size, parametrization="mup",
                      base_width=workloads.LM_LADDER[p.sizes[0]]["d_model"])


def _scaled_runs(plan, size, lr, multiple=1, seeds=None):
    """The runs of `size` at `lr` on `multiple` x its 1x data, one per seed of `seeds`
    (default: all): a 1x run's chunk at every multiple (more calls), so the baseline's 1x,
    2x and 4x runs of a size share one compiled program."""
    return [run._replace(steps=run.steps * multiple, eval_every=run.steps * multiple)
            for run in _sized_runs(plan, _speedup_arm(plan, size), lr)
            if seeds is None or run.seed in seeds]


def speedup_sizes(plan) -> list[dict]:
    """Per size of the preset: its width, params (with and without embeddings, d_ff = 4
    d_model), training FLOPs per token, and its 1x steps and tokens."""
    rows = []
    for size in plan.preset.sizes:
        arm = _speedup_arm(plan, size)
        config, batch, seq_len = workloads.lm_config(size, **arm.overrides())
        steps = _scaled_runs(plan, size, 1.0, seeds={0})[0].steps
        rows.append({"size": size, "width": config.d_model, "params": _params(arm),
                     "non_embedding_params": models.non_embedding_params(config),
                     "flops_per_token": models.flops_per_token(config, seq_len),
                     "steps": steps, "tokens": steps * batch * seq_len})
    return rows


def speedup_flops(plan) -> dict:
    """The study's training FLOPs (`flops_per_token` x tokens), known before it runs: the lr
    grid at the narrowest size (every optimizer, every seed, 1x), the ladder (the baseline
    at each multiple, the others at 1x, every seed; the grid's runs at the best lr left
    out) and the re-tune at the widest size (seed 0; its x1 is the ladder's run)."""
    p = plan.preset
    rows = speedup_sizes(plan)
    one = [row["flops_per_token"] * row["tokens"] for row in rows]   # a 1x run per size
    n = len(plan.optimizers)
    tune = n * len(p.lr_factors) * plan.seeds * one[0]
    ladder = plan.seeds * sum(sum(p.multiples) * one[i] + (n - 1) * one[i]
                              for i in range(len(rows))) - n * plan.seeds * one[0]
    retune = n * len(set(p.retune_factors) - {1.0}) * one[-1]   # x1: the carried run
    return {"tune": tune, "ladder": ladder, "retune": retune,
            "total": tune + ladder + retune}


def _speedups(params, base_tokens, base_losses, tokens, losses, sample):
    """The speedups and slopes on the seeds of `sample` (indices into the per-seed lists,
    repeats allowed: every loss is the mean over them). Per optimizer of `losses`:
    ({size: speedup, None where a mean loss is not finite}, (coefficient, slope), the
    slope None unless every speedup is finite and > 0). Arguments as `speedup_fits`."""
    def mean(per_seed):
        picked = [per_seed[i] for i in sample]
        return (math.inf if any(x is None or not math.isfinite(x) for x in picked)
                else float(np.mean(picked)))

    curves = {size: [mean(per_seed) for per_seed in base_losses[size]] for size in params}
    out = {}
    for name, per_size in losses.items():
        speedups = {}
        for size in params:
            loss, curve = mean(per_size[size]), curves[size]
            speedups[size] = None
            if math.isfinite(loss) and all(math.isfinite(x) for x in curve):
                try:
                    speedups[size] = scoring.data_speedup(base_tokens[size], curve,
                                                          tokens[name][size], loss)
                except ValueError:   # a baseline curve that no fit or interpolation takes
                    pass
        values = [speedups[size] for size in params]
        law = (scaling.fit_power_law([params[size] for size in params], values)
               if all(v is not None and 0 < v < math.inf for v in values) else (None, None))
        out[name] = (speedups, law)
    return out


def speedup_fits(params, base_tokens, base_losses, tokens, losses, seeds, resamples) -> dict:
    """Wen et al.'s speedup per size and its slope in model size, with bootstrap intervals.

    Args:
      params: {size: non-embedding params}, the x of the slope.
      base_tokens: {size: the baseline's token counts} (its 1x, 2x, 4x runs).
      base_losses: {size: [[final loss per seed] per token count]}.
      tokens: {optimizer: {size: the tokens it trained on}}.
      losses: {optimizer: {size: [final loss per seed]}} (None: diverged).
      seeds: the seed indices of the per-seed lists (the same seeds everywhere: a draw takes
        every optimizer's and the baseline's runs of the seeds it draws).
      resamples: bootstrap draws of the seeds (`_seed_resamples`).

    Returns:
      Per optimizer: `speedups` {size: `scoring.data_speedup` of the mean losses},
      `intervals` {size: 95% percentile interval}, `slope` and `coefficient` (speedup =
      coefficient x params^slope, `scaling.fit_power_law`), `slope_interval`, and `dropped`
      (draws without a slope: a speedup not finite).
    """
    point = _speedups(params, base_tokens, base_losses, tokens, losses, seeds)
    draws = {name: {"slope": [], **{size: [] for size in params}} for name in losses}
    # A draw's estimates depend on the multiset of its seeds only (means): each is fitted
    # once (2 seeds: 3 multisets for any number of draws).
    cache = {}
    for sample in _seed_resamples(list(seeds), resamples):
        drawn = tuple(sorted(sample))
        if drawn not in cache:
            cache[drawn] = _speedups(params, base_tokens, base_losses, tokens, losses, drawn)
        for name, (speedups, (_, slope)) in cache[drawn].items():
            draws[name]["slope"].append(math.nan if slope is None else slope)
            for size, value in speedups.items():
                draws[name][size].append(math.nan if value is None else value)
    out = {}
    for name, (speedups, (coefficient, slope)) in point.items():
        out[name] = {"speedups": speedups,
                     "intervals": {size: _interval(draws[name][size]) for size in params},
                     "coefficient": coefficient, "slope": slope,
                     "slope_interval": _interval(draws[name]["slope"]),
                     "dropped": sum(not math.isfinite(x) for x in draws[name]["slope"])}
    return out


def _speedup_ladder(plan, optimizer, lr) -> tuple[dict, dict]:
    """The runs at `optimizer`'s carried `lr`: {(optimizer, size, multiple): runs} (the
    baseline at every multiple, the others at 1x; every seed) and {(optimizer, factor): the
    widest size's seed-0 run at lr x factor} (the re-tune)."""
    p = plan.preset
    ladder = {(optimizer, size, k): _scaled_runs(plan, size, lr, k) for size in p.sizes
              for k in (p.multiples if optimizer == plan.optimizer else (1,))}
    retune = {(optimizer, f): _scaled_runs(plan, p.sizes[-1], lr * f, seeds={0})
              for f in p.retune_factors}
    return ladder, retune


def run_speedup(plan, store, log=print) -> dict:
    """The lr grid at the narrowest size, the ladder at the best lr (muP), the re-tune at
    the widest size; then the speedups over the baseline and their slope in model size."""
    p = plan.preset
    base, seeds = plan.optimizer, list(range(plan.seeds))
    smallest, largest = p.sizes[0], p.sizes[-1]
    recipes = {o: _speedup_recipe(plan, o) for o in plan.optimizers}
    # Runs are keyed by optimizer too: two optimizers' runs may share every Run field.
    done = {o: {} for o in plan.optimizers}
    tune = {(o, f): _scaled_runs(plan, smallest, optim.spec(o).centre_lr * f)
            for o in plan.optimizers for f in p.lr_factors}
    tuning, best = {}, {}
    for o in plan.optimizers:
        # A one-point grid (the smoke preset's) knows its best lr before training: the
        # ladder trains with the grid then, in fewer jobs (fewer programs to compile).
        known = (_speedup_ladder(plan, o, tune[o, p.lr_factors[0]][0].lr)[0]
                 if len(p.lr_factors) == 1 else {})
        done[o].update(execute([r for f in p.lr_factors for r in tune[o, f]]
                               + [r for rs in known.values() for r in rs], recipes[o],
                               store, p.lanes, log))
        per_seed = [[done[o][r]["final_loss"] for r in tune[o, f]] for f in p.lr_factors]
        means = [math.inf if None in losses else float(np.mean(losses))
                 for losses in per_seed]
        i = int(np.argmin(means))
        best[o] = tune[o, p.lr_factors[i]][0].lr if math.isfinite(means[i]) else None
        tuning[o] = {"lrs": [tune[o, f][0].lr for f in p.lr_factors],
                     "losses": [_finite(m) for m in means], "per_seed": per_seed,
                     "best_lr": best[o],
                     "edge": len(p.lr_factors) > 1 and i in (0, len(p.lr_factors) - 1)}
    ladder, retune = {}, {}
    for o in plan.optimizers:
        if best[o] is None:   # diverged at every lr of the grid: nothing to carry
            continue
        runs, checks = _speedup_ladder(plan, o, best[o])
        ladder.update(runs)
        retune.update(checks)
        # Apart: in one job the re-tune's runs would join the widest size's 1x lane, which
        # then would not match its 2x and 4x lanes, and the multiples could not share one
        # program (the re-tune alone, seed 0 x 2 factors, has the lane shape of 2 seeds).
        for part in (runs, checks):
            done[o].update(execute([r for rs in part.values() for r in rs], recipes[o],
                                   store, p.lanes, log))
    rows = speedup_sizes(plan)
    losses = {o: {size: {str(k): [done[o][r]["final_loss"] for r in ladder[o, size, k]]
                         for k in (p.multiples if o == base else (1,))}
                  for size in p.sizes} for o in plan.optimizers if best[o] is not None}
    compared = [o for o in plan.optimizers if o != base and o in losses]
    fits = {}
    if base in losses and compared:
        fits = speedup_fits(
            {row["size"]: row["non_embedding_params"] for row in rows},
            {row["size"]: [k * row["tokens"] for k in p.multiples] for row in rows},
            {size: [losses[base][size][str(k)] for k in p.multiples] for size in p.sizes},
            {o: {row["size"]: row["tokens"] for row in rows} for o in compared},
            {o: {size: losses[o][size]["1"] for size in p.sizes} for o in compared},
            seeds, p.resamples)
    checks = {}
    for o in losses:
        factors = sorted({1.0, *p.retune_factors})
        runs = [ladder[o, largest, 1][0] if f == 1.0 else retune[o, f][0] for f in factors]
        checks[o] = {"factors": factors, "lrs": [r.lr for r in runs],
                     "losses": [done[o][r]["final_loss"] for r in runs]}
    every = {}   # (optimizer, run) of every distinct run, in training order
    for key, rs in [*tune.items(), *ladder.items(), *retune.items()]:
        every.update(dict.fromkeys((key[0], r) for r in rs))
    return {"what": "speedup", "baseline": base, "compared": compared, "sizes": rows,
            "tuning": tuning, "losses": losses, "speedups": fits, "retune": checks,
            "flops": speedup_flops(plan), "n_runs": len(every),
            "runs": [done[o][r] for o, r in every]}


def _speedup_verdict(name, fit):
    interval = fit["slope_interval"]
    if fit["slope"] is None or interval is None:
        return f"{name}: no slope (a speedup that is not finite)."
    if interval[1] < 0:
        trend = "falls with model size (the interval lies below 0), as in Wen et al. 2025"
    elif interval[0] > 0:
        trend = "grows with model size (the interval lies above 0), unlike in Wen et al. 2025"
    else:
        trend = "has no trend these seeds can resolve (the interval contains 0)"
    return f"{name}'s speedup {trend}."


def render_speedup(plan, results):
    p = plan.preset
    base, compared = results["baseline"], results["compared"]
    rows = results["sizes"]
    smallest, largest = rows[0], rows[-1]
    multiples = ", ".join(f"{k:g}x" for k in p.multiples)
    lines = ["# Speedup against model size (Wen et al. 2025)", "",
             f"Preset `{plan.preset_name}` ({p.about}). Wen et al. 2025 "
             "(https://arxiv.org/abs/2509.02046) measure an optimizer's speedup at a model "
             f"size as the data {base} needs to reach its loss / the data it used, at "
             "Chinchilla's 1x = 20 tokens per parameter. Here 1x = "
             f"{p.tokens_per_param:g} tokens per parameter (with embeddings); {base} trains "
             f"at {multiples} (its loss-against-tokens curve), "
             + ", ".join(o for o in plan.optimizers if o != base) + " at 1x. The ladder's "
             "width rungs " + ", ".join(p.sizes) + " (one depth, d_ff = 4 d_model) in muP "
             f"(`parametrization=\"mup\"`, base_width {smallest['width']}, the narrowest "
             "width; hidden matrices' lr x base_width / width for the Adam family, none for "
             "Muon and SOAP, whose steps do not grow with width: `models.mup_lr_multipliers`, "
             "`mup_table`); batch "
             f"{p.batch_size} x {workloads.LM_LADDER[smallest['size']]['seq_len']} tokens at "
             "every size; "
             + (f"linear warmup over the first {p.warmup:.0%} of each run's steps, then "
                if p.warmup else "no warmup, ")
             + "a half cosine to 0.1x at each run's last step; no gradient clipping; "
             f"{plan.seeds} seed(s) (initial params and data order, the same for every "
             "optimizer). Loss: the final eval loss (nats per byte) on 64 fixed held-out "
             "windows.", "",
             "## Sizes", "",
             "| size | width | params | non-embedding | FLOPs / token | 1x steps | 1x tokens |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['size']} | {row['width']} | {row['params']:,} | "
                     f"{row['non_embedding_params']:,} | {row['flops_per_token']:,} | "
                     f"{row['steps']} | {row['tokens']:,} |")
    lines += ["", f"## Learning rates: tuned at `{smallest['size']}`, carried up with muP",
              "",
              f"Mean final loss over seeds at 1x on `{smallest['size']}` for lr = centre_lr x "
              "f (`optim.spec`; the spec's `race_hparams` fixed); the best lr trains every "
              "size unchanged (muP transfers it). edge: the best is at the grid's edge.", "",
              "| optimizer | fixed | muP table | " + " | ".join(f"f = {f:g}" for f in
                                                              p.lr_factors)
              + " | carried lr |", "|---|---|---|" + "---|" * (len(p.lr_factors) + 1)]
    for o in plan.optimizers:
        t = results["tuning"][o]
        fixed = ", ".join(f"{k}={v}" for k, v in optim.spec(o).race_hparams.items()) or "-"
        cells = [f"{_fmt(loss, '.4f')} (lr {lr:.3g})" for lr, loss in zip(t["lrs"],
                                                                         t["losses"])]
        carried = ("diverged at every lr" if t["best_lr"] is None else
                   f"{t['best_lr']:.3g}" + (" (edge)" if t["edge"] else "")
                   + (" (not tuned: one point)" if len(t["lrs"]) == 1 else ""))
        lines.append(f"| {o} | {fixed} | {mup_table(o)} | " + " | ".join(cells)
                     + f" | {carried} |")
    columns = [(base, k) for k in p.multiples] + [(o, 1) for o in compared]
    lines += ["", "## Final losses", "",
              "Mean over seeds (each seed's in brackets); - = diverged or not run.", "",
              "| size | " + " | ".join(f"{o} {k:g}x" for o, k in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for o, k in columns:
            per_seed = results["losses"].get(o, {}).get(row["size"], {}).get(str(k))
            cells.append("-" if per_seed is None else
                         f"{_fmt(_mean(per_seed), '.4f')} ("
                         + " ".join(_fmt(x, ".4f") for x in per_seed) + ")")
        lines.append(f"| {row['size']} | " + " | ".join(cells) + " |")
    fits = results["speedups"]
    lines += ["", f"## Speedup over {base}", "",
              f"Speedup = D_needed / D: D_needed from `scoring.data_speedup` on {base}'s "
              f"loss against tokens at that size (its {multiples} losses, mean over seeds: the "
              "saturating power law L = E + B D^-beta through them, log-log interpolation "
              "where the fit is poor; beyond its largest run it extrapolates), D the 1x tokens "
              f"(> 1: less data than {base}). Slope: of log speedup against log non-embedding "
              f"params (`scaling.fit_power_law`). {CONFIDENCE:.0%} bootstrap intervals over "
              f"seeds ({p.resamples} resamples of the {plan.seeds} seeds, each draw's means "
              "for every optimizer and size; with 2 seeds an interval spans the seeds' own "
              "estimates). Wen et al.: matrix-based optimizers' speedup falls from 1.4x at "
              "0.1B params to 1.1x at 1.2B, a slope of about -0.1.", ""]
    if not fits:
        lines.append(f"Not computed: {base} or every compared optimizer diverged at every "
                     "lr of its grid.")
    else:
        lines += ["| size | non-embedding | " + " | ".join(compared) + " |",
                  "|---|---|" + "---|" * len(compared)]
        for row in rows:
            cells = [f"{_fmt(fits[o]['speedups'][row['size']], '.3f')} "
                     f"{_fmt_interval(fits[o]['intervals'][row['size']])}" for o in compared]
            lines.append(f"| {row['size']} | {row['non_embedding_params']:,} | "
                         + " | ".join(cells) + " |")
        lines.append("| slope | | " + " | ".join(
            f"{_fmt(fits[o]['slope'], '.3f')} {_fmt_interval(fits[o]['slope_interval'])}"
            for o in compared) + " |")
        lines += [""] + [_speedup_verdict(o, fits[o]) for o in compared]
        dropped = [f"{o} {fits[o]['dropped']}" for o in compared if fits[o]["dropped"]]
        if dropped:
            lines += ["", f"Draws without a slope (a speedup not finite), of {p.resamples}: "
                      + ", ".join(dropped) + "."]
    factors = sorted({1.0, *p.retune_factors})
    lines += ["", f"## Re-tune at `{largest['size']}`", "",
              "Is the carried lr still right at the widest size? Seed 0 at 1x with the "
              "carried lr x " + ", ".join(f"{f:g}" for f in factors) + ".", "",
              "| optimizer | carried lr | " + " | ".join(f"x{f:g}" for f in factors)
              + " | best | loss gained by re-tuning |",
              "|---|---|" + "---|" * (len(factors) + 2)]
    kept = 0
    for o, check in results["retune"].items():
        losses = [math.inf if x is None else x for x in check["losses"]]
        i = int(np.argmin(losses))
        carried = check["factors"].index(1.0)
        kept += i == carried
        gain = (losses[carried] - losses[i]) if math.isfinite(losses[i]) else None
        lines.append(f"| {o} | {check['lrs'][carried]:.3g} | "
                     + " | ".join(_fmt(x, ".4f") for x in check["losses"])
                     + f" | x{check['factors'][i]:g} | {_fmt(gain, '.4f')} |")
    if results["retune"] and len(factors) > 1:
        lines += ["", f"The carried lr is the best of these {len(factors)} for "
                  f"{kept} of {len(results['retune'])} optimizer(s)."]
    elif results["retune"]:
        lines += ["", "Not re-tuned in this preset (its only factor is 1: the carried runs)."]
    flops = results["flops"]
    lines += ["", "## Compute", "",
              f"Training FLOPs of the study (`models.flops_per_token` x tokens; evaluation and "
              f"the optimizers' own work excluded): {flops['total']:.3g} = the lr grid "
              f"{flops['tune']:.3g} + the ladder {flops['ladder']:.3g} + the re-tune "
              f"{flops['retune']:.3g}, in {results['n_runs']} runs."]
    return lines


def plot_speedup(plan, results, path):
    """Speedup against non-embedding params (log x) per optimizer with its interval, the
    baseline = 1 dashed; and every size's loss against tokens."""
    fig = Figure(figsize=(12, 4.4))
    ax = fig.add_subplot(1, 2, 1)
    base, rows, fits = results["baseline"], results["sizes"], results["speedups"]
    params = [row["non_embedding_params"] for row in rows]
    ax.axhline(1.0, linestyle="--", color="gray", label=f"{base} (= 1)")
    for o, color in zip(results["compared"], ("tab:blue", "tab:orange", "tab:green",
                                              "tab:red", "tab:purple", "tab:brown")):
        if o not in fits:
            continue
        values = [fits[o]["speedups"][row["size"]] for row in rows]
        values = [math.nan if v is None or not math.isfinite(v) else v for v in values]
        low = [v - i[0] if i is not None else 0.0 for v, i in
               zip(values, (fits[o]["intervals"][row["size"]] for row in rows))]
        high = [i[1] - v if i is not None else 0.0 for v, i in
                zip(values, (fits[o]["intervals"][row["size"]] for row in rows))]
        ax.errorbar(params, values, yerr=[np.maximum(low, 0), np.maximum(high, 0)], fmt="o-",
                    color=color, capsize=3,
                    label=f"{o}: slope {_fmt(fits[o]['slope'], '.2f')} "
                    f"{_fmt_interval(fits[o]['slope_interval'], '.2f')}")
        if fits[o]["slope"] is not None:   # the fitted power law
            grid = np.geomspace(min(params), max(params), 20)
            ax.plot(grid, fits[o]["coefficient"] * grid ** fits[o]["slope"], ":",
                    color=color)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel(f"speedup over {base} (data {base} needs / data used)")
    ax.set_title("speedup against model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    markers = dict(zip(results["compared"], "s^vDP*"))
    for row, color in zip(rows, _colors(len(rows))):
        losses = results["losses"]
        if base in losses:
            curve = [(k * row["tokens"], _mean(per_seed))
                     for k, per_seed in ((float(k), v) for k, v in
                                         losses[base][row["size"]].items())]
            ax.plot([t for t, _ in curve], [math.nan if x is None else x for _, x in curve],
                    "o-", color=color, label=f"{row['size']}: {base}")
        for o in results["compared"]:
            loss = _mean(losses[o][row["size"]]["1"])
            ax.plot([row["tokens"]], [math.nan if loss is None else loss], markers[o],
                    color=color, markersize=8, markeredgecolor="black",
                    label=o if row is rows[0] else None)
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("final eval loss (nats / byte)")
    ax.set_title(f"{base} at " + ", ".join(f"{k:g}x" for k in plan.preset.multiples)
                 + "; the others at 1x")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.07, right=0.98, wspace=0.25, bottom=0.12)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- the job

STUDIES = {
    "isoflop": (run_isoflop, render_isoflop, plot_isoflop),
    "critical_batch": (run_critical_batch, render_critical_batch, plot_critical_batch),
    "lr_batch": (run_lr_batch, render_lr_batch, plot_lr_batch),
    "ffn": (run_ffn, render_ffn, plot_ffn),
    "speedup": (run_speedup, render_speedup, plot_speedup),
}


def timing_section(results, trained, read_back, compiling, peak):
    """The wall clock: aggregate model FLOP/s of the study's runs (their own timings, read
    back ones included) and its fraction of the measured matmul peak."""
    runs = results["runs"]
    flops = sum(r["flops_per_token"] * r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    lines = ["", TIMING_HEADING, "",
             f"Measured on {jax.devices()[0].device_kind} ({os.cpu_count()} cores visible). "
             f"This invocation trained {trained} run(s) and read {read_back} back from "
             f"{RUNS_FILE} (with the timings they were trained with); compiling took "
             f"{compiling:.1f} s."]
    if seconds > 0:
        rate = flops / seconds
        lines += ["", f"Model FLOPs (`models.flops_per_token` x tokens trained; evaluation "
                  f"and the optimizer excluded): {flops:.3g} in {seconds:.1f} s of training: "
                  f"{rate / 1e9:.3g} GFLOP/s aggregate, {rate / peak:.1%} of the "
                  f"{peak / 1e9:.3g} GFLOP/s of a float32 1024^2 matmul measured in this "
                  "process."]
    return lines


def _flag_values():
    """The job's flags, on a FlagValues of their own: `main` can run in a process that
    imported other jobs (tests), and again with other flags."""
    values = flags.FlagValues()
    flags.DEFINE_string("what", None, f"The study: {', '.join(WHATS)}.", flag_values=values)
    flags.DEFINE_string("preset", "default", "smoke (the tests' seconds-long check) or "
                        "default (the study; <= 40 min on 2 cores, speedup <= 60).",
                        flag_values=values)
    flags.DEFINE_string("workdir", None, "Output folder; a rerun resumes from its "
                        f"{RUNS_FILE}.", flag_values=values)
    flags.DEFINE_integer("seeds", None, "Seeds per setting (default: the preset's).",
                         flag_values=values)
    flags.DEFINE_string("optimizer", "adamw", "A registered optimizer (`optim.spec`): its "
                        "centre_lr and race_hparams set the runs (speedup: the baseline).",
                        flag_values=values)
    flags.DEFINE_list("optimizers", None, "speedup only: the optimizers compared, the "
                      "baseline (--optimizer) among them (default: the preset's).",
                      flag_values=values)
    return values


def _parse(argv):
    values = _flag_values()
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv):
        print(__doc__.split("\n\n")[0] + "\n\n" + values.get_help())
        sys.exit(0)
    try:
        rest = values(["ravine-scaling", *argv])
    except flags.Error as error:
        cli.fail(error)
    if len(rest) > 1:
        cli.fail(f"unexpected arguments: {' '.join(rest[1:])}")
    return values


def write_outputs(plan, results, text):
    """DIR/results.json, DIR/report.md and the study's figure."""
    _, _, plot = STUDIES[plan.what]
    write_atomically(os.path.join(plan.workdir, RESULTS_FILE),
                     json.dumps(results, indent=1, default=str))
    write_atomically(os.path.join(plan.workdir, REPORT_FILE), text)
    plot(plan, results, os.path.join(plan.workdir, FIGURES[plan.what]))


def run_study(plan, log=print) -> tuple[dict, str]:
    """Trains (or reads back) `plan`'s runs, writes the outputs; (results, report text)."""
    run, render, _ = STUDIES[plan.what]
    store = Store(plan.workdir)
    if store.damaged:
        log(f"scaling: skipped {store.damaged} damaged line(s) of {store.path} (a kill "
            "while writing); their runs train again")
    known = set(store.results)
    before = compile_seconds()
    results = run(plan, store, log)
    trained = len(set(store.results) - known)
    compiling = compile_seconds() - before
    results.update(preset=plan.preset_name, preset_settings=plan.preset._asdict(),
                   optimizer=plan.optimizer, seeds=plan.seeds)
    if plan.optimizers:
        results.update(optimizers=list(plan.optimizers))
    lines = render(plan, results)
    lines += timing_section(results, trained, len(results["runs"]) - trained,
                            compiling, matmul_flops_per_second())
    text = "\n".join(lines) + "\n"
    write_outputs(plan, results, text)
    return results, text


def main(argv=None) -> int:
    """`ravine-scaling`: runs one study (`--what`) and prints its report.

    Args:
      argv: the command-line arguments after the program's name (default: sys.argv[1:]).

    Returns:
      0; bad flags exit 2 with one line on stderr (`cli.fail`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    values = _parse(argv)
    began = time.perf_counter()
    with cli.usage_errors():
        plan = make_plan(values.what, values.preset, values.workdir, values.seeds,
                         values.optimizer, values.optimizers)
    with workdir_lib.lock(plan.workdir):
        _, text = run_study(plan)
    print(text)
    print(f"scaling: {time.perf_counter() - began:.0f} s; report in "
          f"{os.path.join(plan.workdir, REPORT_FILE)}, figure in "
          f"{os.path.join(plan.workdir, FIGURES[plan.what])}, runs in "
          f"{os.path.join(plan.workdir, RUNS_FILE)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
