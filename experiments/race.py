r"""Race optimizers on one workload: seeds, intervals, and learning-rate grids that cannot miss.

    python -m ravine.experiments.race --workdir=runs/race --optimizers=adamw,lion,shampoo,soap,muon

For each optimizer (the LM config `--config`, default `lm.py:tiny`; any field can be set as
in experiments.train, e.g. `--config.steps=200`):

1. Select the learning rate: `--lr_points` (default 5) peak lrs on a log grid spaced by
   `--lr_spacing` (2x) around the optimizer's `optim.spec(name).centre_lr` (or the explicit `--lrs`), each
   with `--seeds` seeds (default 1). When the best (lowest mean final eval loss) sits at an
   edge of the grid, the grid is extended past that edge, one point at a time, up to
   `--max_lr_points`; diverged runs (non-finite loss) rank last and extend a grid only
   downward.
2. Measure: `--seeds_at_best` (default 3) NEW seeds at the best lr and its two neighbours.
   The reported numbers come only from these seeds, never from those that picked the lr
   (which would bias the result low).

The report (`DIR/report.md`, printed) ranks the optimizers by mean final eval loss at their
best lr: mean ± 95% Student-t interval over the report seeds, the paired t-test p-value
against `--baseline` (default the first optimizer; runs with the same seed share the
initial params and the data order, so they pair), steps to the target eval loss (`--target`,
default the baseline's mean final eval loss; linearly interpolated between evals, which
come every 5% of training by default; censored: "k of N reached" and the median of those),
seconds to target (= steps x seconds per step of one run trained alone), and the optimizer
state's size. `DIR/curves.png` shows the mean eval loss ±1 std of each optimizer against
steps and seconds; `DIR/lr_sensitivity.png` the final eval loss against lr (U-curves, error
bars over seeds).

Runs of one optimizer share one compiled step (`runtime.sweep`): `--sweep=loop` trains
them one after another, `--sweep=vmap` `--runs_per_program` of them side by side in one
vmapped program (optimizers whose spec is not `vmappable` fall back to loop). Each run
equals the same (lr, seed) trained alone by the train job. Every run's metrics are kept in
`DIR/runs/<optimizer>/lr<lr>_seed<seed>.jsonl` and the report is computed from them; a
killed race resumes: finished runs are read back and an interrupted group of runs restarts
from its own checkpoint (`DIR/groups/`) to the same numbers (a damaged one is skipped as
the train job skips one: one warning line naming it, then the one before, or the group's
start). A metrics file that is damaged (empty, cut short, not JSON rows) or a damaged
`timing.json` is retrained / measured again with one warning line naming it; a damaged
`race.json` exits 2 naming it. One race per workdir: `DIR/lock` (as the train job's,
`runtime/workdir.py`) refuses a second one, naming the holder's pid. `DIR/race.json`
records the workload and the corpus' SHA-256: a rerun with another workload or changed data
is refused. `--config.init_from` (a branch of another run) is refused: every run starts from
its seed's initial params.

Everything optimizer-specific comes from its record, `optim.spec(name)`: the grid's centre,
hyperparameters the race fixes (`race_hparams`, e.g. the peak lr of Muon's AdamW leaves;
override with `--hparams=muon.adam_learning_rate=0.01`), a constant lr with its own warmup
(Schedule-Free AdamW), config it cannot honour (K-FAC's clipping, turned off with one
warning line, as in the train job), a train step of its own (K-FAC, one compiled step per
run; `--optimizers=adamw,kfac`).
"""
import ast
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import sys

import jax
import numpy as np
from absl import flags, logging

from ravine.experiments.runtime import run_identity, setup
from ravine import optim
from ravine.experiments.runtime import builders, cli, sweep
from ravine.experiments.runtime import workdir as workdir_lib
from ravine.experiments import race_stats, train

# --config and --workdir as in experiments.train; the race's default workload is tiny. (The
# default is given when the flag is defined: ml_collections applies `--config.<field>`
# overrides then, so changing it later breaks them.)
_CONFIG, _WORKDIR, _ = train.define_flags(train.DEFAULT_CONFIG + ":tiny")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["adamw", "lion", "shampoo", "soap", "muon"],
                                "Optimizers to race (names from optim.available()).")
_LRS = flags.DEFINE_list("lrs", [], "Explicit initial learning rates for every optimizer "
                         "(default: a grid around each one's spec centre_lr).")
_LR_POINTS = flags.DEFINE_integer("lr_points", 5, "Learning rates per optimizer (>= 2).")
_MAX_LR_POINTS = flags.DEFINE_integer(
    "max_lr_points", None, "Most learning rates per optimizer once the grid is extended past "
    "an edge (default: the initial points + 4).")
_LR_SPACING = flags.DEFINE_float("lr_spacing", 2.0, "Ratio of neighbouring lrs.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds at every learning rate (they pick the lr).")
_SEEDS_AT_BEST = flags.DEFINE_integer(
    "seeds_at_best", 3, "New seeds at each optimizer's best lr and its two neighbours (the "
    "reported numbers come from these).")
_BASELINE = flags.DEFINE_string("baseline", None, "Optimizer the others are tested against "
                                "(default: the first of --optimizers).")
_TARGET = flags.DEFINE_float("target", None, "Target eval loss for steps-to-target "
                             "(default: the baseline's mean final eval loss).")
_SWEEP = flags.DEFINE_enum("sweep", None, ["loop", "vmap"], "How the runs of a sweep share "
                           "their compiled step (default: loop on CPU, vmap otherwise).")
_RUNS_PER_PROGRAM = flags.DEFINE_integer("runs_per_program", 16,
                                         "Runs trained together in one vmapped program.")
_HPARAMS = flags.DEFINE_list(
    "hparams", [], "OPTIMIZER.HPARAM=VALUE hyperparameters the race sets, over each "
    "optimizer's own (`optim.spec(name).race_hparams`, e.g. muon.adam_learning_rate=0.003).")
_EVALS = flags.DEFINE_integer("evals", 20, "Evaluations per run (sets config.eval_every; "
                              "20 = every 5% of training).")

REPORT_FILE, CURVES_FILE, SENSITIVITY_FILE = "report.md", "curves.png", "lr_sensitivity.png"
RUNS_DIR, GROUPS_DIR, TIMING_FILE, RACE_FILE = "runs", "groups", "timing.json", "race.json"
# Config fields a race may change between invocations in one workdir (they do not change
# any run's numbers); anything else changed means other runs: a new workdir.
FREE_FIELDS = ("checkpoint_every", "keep_checkpoints", "mesh", "peak_flops", "corpus")


def _flatten(record, prefix=""):
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_same_race(workdir, base, evals, hparams, corpus=None):
    """Records what every run's numbers depend on in DIR/race.json; a workdir holding runs
    of another workload raises ValueError listing the changed fields (finished runs are
    read back by (optimizer, lr, seed) only, so they must come from the same workload).

    `corpus` (a `data.Corpus`): its SHA-256 is recorded too; changed data is refused naming
    the corpus (its path may change: `FREE_FIELDS`). A race.json from before it was recorded
    is not checked for it."""
    record = {"config": run_identity.config_record(base), "evals": evals,
              "hparams": hparams}
    if corpus is not None:
        record["corpus_sha256"] = corpus.sha256
    for field in FREE_FIELDS:
        record["config"].pop(field, None)
    path = os.path.join(workdir, RACE_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ValueError(f"{path!r} cannot be read ({reason}); restore it, or use a new "
                             "--workdir") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError(f"{path!r} is not a race record (a JSON object with a config); "
                             "restore it, or use a new --workdir")
        if corpus is not None and saved.get("corpus_sha256", corpus.sha256) != corpus.sha256:
            raise ValueError(f"--workdir {workdir!r} holds a race on other data: the corpus "
                             f"{corpus.path!r} changed (SHA-256 {saved['corpus_sha256'][:12]} "
                             f"-> {corpus.sha256[:12]}); restore it, or use a new --workdir")
        if corpus is None or "corpus_sha256" not in saved:
            record.pop("corpus_sha256", None)
            saved.pop("corpus_sha256", None)
        old = _flatten(saved)
        new = _flatten(json.loads(json.dumps(record)))
        changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        if changed:
            raise ValueError(f"--workdir {workdir!r} holds a race of another workload (changed: "
                             f"{', '.join(changed[:5])}); use a new --workdir")
        return
    os.makedirs(workdir, exist_ok=True)
    _write_atomic(path, json.dumps(record, indent=1))


@contextlib.contextmanager
def claim_workdir(workdir, base, evals, hparams, corpus=None):
    """Holds the race's workdir while the block runs: its lock (`runtime/workdir.py`: one
    race per workdir; another live holder raises `WorkdirBusy` naming its pid; a --workdir
    that cannot be a folder raises `cli.UsageError`), then `check_same_race`."""
    with workdir_lib.lock(workdir):
        check_same_race(workdir, base, evals, hparams, corpus)
        yield


def check_base(base):
    """ValueError for config the race does not apply: every run starts from its seed's
    initial params, so `init_from` (a branch of another run) is refused."""
    if base.get("init_from"):
        raise ValueError(f"--config.init_from={base.init_from!r}: the race trains every run "
                         "from its seed's initial params and cannot branch; drop it, or "
                         "branch single runs with experiments.train")


def default_sweep_mode():
    """The faster way to share work on this backend (experiments/benchmarks/bench_race.py): on CPU a
    small model is compute-bound and vmap is slower; on accelerators it is launch-bound."""
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def lr_grid(name, points, spacing, explicit=()):
    """The initial learning rates for optimizer `name`: `explicit` if given, else `points`
    values spaced by `spacing` (log grid) centred on the optimizer's `centre_lr`."""
    if explicit:
        return sorted(explicit)
    centre = optim.spec(name).centre_lr
    return [centre * spacing ** (i - (points - 1) / 2) for i in range(points)]


def _positive(name, value, minimum=1):
    if value is None or value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def validate_flags(optimizers, lrs=(), points=5, spacing=2.0, target=None, evals=20,
                   hparams=(), max_points=None, seeds=1, seeds_at_best=3,
                   baseline=None, runs_per_program=16):
    """ValueError naming the first bad flag; returns (explicit lrs as floats, max points,
    baseline, {optimizer: the hyperparameters the race sets})."""
    if not optimizers:
        raise ValueError("--optimizers is empty")
    known = [spec.name for spec in optim.specs()]
    for name in optimizers:
        if name not in known:
            raise ValueError(f"unknown optimizer {name!r} in --optimizers; known: "
                             f"{', '.join(known)}")
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"--optimizers lists an optimizer twice: {','.join(optimizers)}")
    parsed = []
    for text in lrs:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--lrs: {text!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"--lrs: learning rate {text} must be a positive number")
        parsed.append(value)
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"--lrs lists a learning rate twice: {','.join(lrs)}")
    if not parsed:
        _positive("lr_points", points, 2)
    initial = len(parsed) or points
    if max_points is None:
        max_points = initial + 4
    elif max_points < initial:
        raise ValueError(f"--max_lr_points ({max_points}) must be >= the initial grid's "
                         f"{initial} points (--lr_points / --lrs)")
    if not spacing > 1 or not math.isfinite(spacing):
        raise ValueError(f"--lr_spacing must be > 1, got {spacing}")
    _positive("evals", evals)
    _positive("seeds", seeds)
    _positive("seeds_at_best", seeds_at_best)
    _positive("runs_per_program", runs_per_program)
    if baseline is None:
        baseline = optimizers[0]
    elif baseline not in optimizers:
        raise ValueError(f"--baseline {baseline!r} is not in --optimizers "
                         f"({','.join(optimizers)})")
    if target is not None and not math.isfinite(target):
        raise ValueError(f"--target must be a finite loss, got {target}")
    return parsed, max_points, baseline, race_hparams(optimizers, hparams)


def race_hparams(optimizers, items=()):
    """`{optimizer: {hparam: value}}`: each one's `spec.race_hparams`, overridden by the
    `OPTIMIZER.HPARAM=VALUE` items of `--hparams` (values as Python literals)."""
    chosen = {name: dict(optim.spec(name).race_hparams) for name in optimizers}
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, hparam = key.strip().partition(".")
        if not (sep and dot and hparam):
            raise ValueError(f"--hparams: {item!r} is not OPTIMIZER.HPARAM=VALUE")
        if name not in chosen:
            raise ValueError(f"--hparams: {item!r} names optimizer {name!r}, which is not in "
                             f"--optimizers ({','.join(optimizers)})")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        chosen[name][hparam] = value
    return chosen


def run_config(base, name, lr, hparams=None, evals=20):
    """`base` with optimizer `name` at peak learning rate `lr` (other hparams at their
    defaults but `hparams`, default its spec's `race_hparams`; the schedule's peak = lr),
    evaluated `evals` times.

    What the optimizer's spec says is applied as the train job applies it: one that takes a
    constant lr (Schedule-Free AdamW) gets a constant schedule, warmed up over the base
    schedule's warmup_steps by its own warmup argument; config it cannot honour (K-FAC's
    global-norm clipping) is set to what it runs with, with one warning line.
    """
    spec = optim.spec(name)
    hparams = dict(spec.race_hparams) if hparams is None else hparams
    config = copy.deepcopy(base)
    config.eval_every = max(1, config.steps // evals)
    with config.unlocked():
        for key in config.optimizer:
            if key not in ("name", "no_decay", "muon_exclude"):
                config.optimizer[key] = None
        config.optimizer.name = name
        config.optimizer.learning_rate = lr
        config.schedule.peak_value = None
        for key, value in hparams.items():
            if key not in config.optimizer:
                raise ValueError(f"--hparams: optimizer {name!r} takes no {key!r}")
            config.optimizer[key] = value
        if spec.constant_lr:
            if spec.warmup_hparam:
                config.optimizer[spec.warmup_hparam] = config.schedule.get("warmup_steps") or None
            for key in config.schedule:
                config.schedule[key] = None
            config.schedule.name = "constant"
    return builders.adapt_to_optimizer(config)


# ----------------------------------------------------------------------------- one run's rows


def summarize(rows, steps):
    """A run's record from its metrics rows: final eval loss (NaN when diverged), the eval
    curve [(step, eval_loss)] and whether it diverged (a non-finite loss, a skipped
    non-finite step, or stopped before `steps`)."""
    curve = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]
    losses = [row[key] for row in rows for key in ("loss", "eval_loss") if key in row]
    diverged = (not rows or rows[-1]["step"] < steps or rows[-1].get("skipped_steps", 0) > 0
                or not all(math.isfinite(v) for v in losses))
    final = math.nan if diverged or not curve else curve[-1][1]
    return {"final_eval_loss": final, "curve": curve, "diverged": diverged}


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_rows(path, steps):
    """`(rows, None)` from a finished run's metrics file, or `(None, what is wrong)` when it
    is damaged: unreadable, empty, a line that is not a JSON row, or ending before `steps`
    with no sign of divergence (a diverged run ends early on a non-finite loss, or counts
    skipped steps; a file cut short has only finite losses)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot be read ({getattr(error, 'strerror', None) or error})"
    if not lines:
        return None, "is empty"
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            return None, f"line {number} is not a JSON metrics row"
        rows.append(row)
    losses = [row[key] for row in rows for key in ("loss", "eval_loss") if key in row]
    if not all(_is_number(v) for v in losses):
        return None, "holds a loss that is not a number"
    skipped = rows[-1].get("skipped_steps", 0)
    ended = (rows[-1]["step"] >= steps or (_is_number(skipped) and skipped > 0)
             or not all(math.isfinite(v) for v in losses))
    if not ended:
        return None, (f"ends at step {rows[-1]['step']} of {steps} with finite losses "
                      "(cut short)")
    return rows, None


def read_timing(path):
    """`(timing, None)` from a timing file, or `(None, what is wrong)`."""
    try:
        with open(path) as f:
            timing = json.load(f)
    except (OSError, ValueError) as error:
        return None, f"cannot be read ({getattr(error, 'strerror', None) or error})"
    if not isinstance(timing, dict):
        return None, "is not a JSON object"
    for key in ("seconds_per_step", "state_bytes", "params"):
        value = timing.get(key)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            return None, f"has no valid {key!r}"
    return timing, None


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _finite_or_inf(value):
    return value if value is not None and math.isfinite(value) else math.inf


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class OptimizerSweep:
    """The runs of one optimizer in a race: reads back finished runs, trains missing ones
    (in groups sharing one compiled step), keeps every run's metrics."""

    def __init__(self, config, workdir, mode, runs_per_program):
        self.config, self.name = config, config.optimizer.name
        self.mode = mode if sweep.can_vectorize(self.name) else "loop"
        self.runs_per_program = runs_per_program
        self.runs_dir = os.path.join(workdir, RUNS_DIR, self.name)
        self.groups_dir = os.path.join(workdir, GROUPS_DIR, self.name)
        self._engine = None
        self.rows = {}   # SweepRun -> metrics rows
        self.damaged = set()  # runs whose file was damaged (retrained)

    @property
    def engine(self):
        if self._engine is None:
            self._engine = sweep.Engine(self.config)
        return self._engine

    def _path(self, run):
        return os.path.join(self.runs_dir, run.key + ".jsonl")

    def _read(self, run):
        """The finished rows of `run`, or None: not trained yet, or its file is damaged
        (`read_rows`; warned about once, then retrained)."""
        path = self._path(run)
        if run not in self.rows and os.path.exists(path) and run not in self.damaged:
            rows, problem = read_rows(path, self.config.steps)
            if problem:
                self.damaged.add(run)
                _warn(f"race: {path} {problem}; training that run again")
            else:
                self.rows[run] = rows
        return self.rows.get(run)

    def missing(self, runs):
        """Those of `runs` with no finished, intact metrics file."""
        return [run for run in runs if self._read(run) is None]

    def train(self, runs):
        """Trains those of `runs` that are not finished; returns {run: record}."""
        missing = self.missing(runs)
        size = self.runs_per_program if self.mode == "vmap" else 1
        for start in range(0, len(missing), size):
            group = missing[start:start + size]
            keys = ",".join(run.key for run in group)
            group_dir = os.path.join(
                self.groups_dir, f"{self.mode}_{hashlib.sha1(keys.encode()).hexdigest()[:12]}")
            print(f"race: {self.name} training {len(group)} run(s) ({self.mode}): "
                  f"{' '.join(run.key for run in group)}", flush=True)
            rows = self.engine.train_group(group, group_dir, vectorized=self.mode == "vmap")
            os.makedirs(self.runs_dir, exist_ok=True)
            for run, run_rows in rows.items():
                _write_atomic(self._path(run), "".join(json.dumps(r) + "\n" for r in run_rows))
                self.rows[run] = run_rows
                self.damaged.discard(run)
            shutil.rmtree(group_dir, ignore_errors=True)
        return {run: dict(summarize(self._read(run), self.config.steps), lr=run.lr,
                          seed=run.seed) for run in runs}

    def timing(self, lr):
        """{"seconds_per_step", "state_bytes"} of one run alone (measured once, then read
        back from DIR/runs/<optimizer>/timing.json)."""
        path = os.path.join(self.runs_dir, TIMING_FILE)
        if os.path.exists(path):
            timing, problem = read_timing(path)
            if not problem:
                return timing
            _warn(f"race: {path} {problem}; measuring again")
        result = {"seconds_per_step": self.engine.seconds_per_step(lr),
                  "state_bytes": self.engine.state_bytes(), "params": self.engine.setup.n_params}
        os.makedirs(self.runs_dir, exist_ok=True)
        _write_atomic(path, json.dumps(result))
        return result


def _mean_loss(records):
    """Mean final eval loss of runs at one lr; inf when any diverged."""
    losses = [r["final_eval_loss"] for r in records]
    return statistics.fmean(losses) if all(math.isfinite(v) for v in losses) else math.inf


def race_one(config, workdir, *, grid, spacing, max_points, seeds, seeds_at_best, mode,
             runs_per_program):
    """Selects the lr (grid extended past edges) and trains the report seeds of one
    optimizer; returns its result dict."""
    job = OptimizerSweep(config, workdir, mode, runs_per_program)
    select_seeds = [config.seed + i for i in range(seeds)]
    report_seeds = [config.seed + seeds + i for i in range(seeds_at_best)]
    selection = {}

    def losses_at(lrs):
        records = job.train([sweep.SweepRun(lr, s) for lr in lrs for s in select_seeds])
        selection.update(records)
        return {lr: _mean_loss([records[sweep.SweepRun(lr, s)] for s in select_seeds])
                for lr in lrs}

    grid, losses, added = race_stats.settle_grid(grid, losses_at, spacing, max_points)
    finite = [lr for lr in grid if math.isfinite(losses[lr])]
    best = min(finite, key=lambda lr: losses[lr]) if finite else grid[0]
    i = grid.index(best)
    around = grid[max(0, i - 1):i + 2]
    reported = job.train([sweep.SweepRun(lr, s) for lr in around for s in report_seeds])
    timing = job.timing(best)
    return {"optimizer": job.name, "mode": job.mode, "grid": grid, "added": added,
            "best_lr": best, "at_edge": len(grid) > 1 and best in (grid[0], grid[-1]),
            "selection": selection, "reported": reported, "report_seeds": report_seeds,
            "best_runs": [reported[sweep.SweepRun(best, s)] for s in report_seeds],
            **timing}


def race(base, optimizers, workdir, *, lrs=(), points=5, spacing=2.0, max_points=None,
         seeds=1, seeds_at_best=3, baseline=None, target=None, mode="loop",
         runs_per_program=16, hparams=None, evals=20):
    """Runs the race; returns (results per optimizer, target, its source). `hparams`:
    `{optimizer: hyperparameters the race sets}` (default: `race_hparams(optimizers)`)."""
    baseline = baseline or optimizers[0]
    hparams = race_hparams(optimizers) if hparams is None else hparams
    results = []
    for name in optimizers:
        config = run_config(base, name, optim.spec(name).centre_lr, hparams[name], evals)
        grid = lr_grid(name, points, spacing, lrs)
        results.append(race_one(
            config, workdir, grid=grid, spacing=spacing,
            max_points=max_points or len(grid) + 4, seeds=seeds, seeds_at_best=seeds_at_best,
            mode=mode, runs_per_program=runs_per_program))
    target, source = score(results, baseline, target)
    return results, target, source


def score(results, baseline, target=None):
    """Adds the report's numbers to each optimizer's result (from its `best_runs`: mean, CI
    half width, n, diverged count, paired p-value against `baseline`, k of N reached,
    median steps to target); returns (target, where it came from).

    The target defaults to the baseline's mean final eval loss at its best lr."""
    base_result = next(r for r in results if r["optimizer"] == baseline)
    source = "given"
    if target is None:
        target = race_stats.mean_ci([r["final_eval_loss"] for r in base_result["best_runs"]])[0]
        source = f"mean final eval loss of {baseline} at its best lr"
    base_losses = [run["final_eval_loss"] for run in base_result["best_runs"]]
    for r in results:
        losses = [run["final_eval_loss"] for run in r["best_runs"]]
        r["mean"], r["half"], r["n"] = race_stats.mean_ci(losses)
        r["diverged"] = sum(run["diverged"] for run in r["best_runs"])
        r["p"] = (math.nan if r is base_result
                  else race_stats.paired_p_value(losses, base_losses))
        steps = [None if run["diverged"] else race_stats.steps_to_target(run["curve"], target)
                 for run in r["best_runs"]]
        r["reached"], r["runs"], r["median_steps"] = race_stats.censored(steps)
    return target, source


# ----------------------------------------------------------------------------- the report


def _fmt(value, spec):
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _grid_note(r):
    """E.g. "7 lrs 0.00075..0.048, extended up by 2"."""
    grid, added = r["grid"], r["added"]
    text = f"{len(grid)} lrs {grid[0]:.3g}..{grid[-1]:.3g}"
    initial = [lr for lr in grid if lr not in added]
    downs = sum(lr < min(initial) for lr in added)
    moves = [f"{word} by {count}" for word, count in
             (("down", downs), ("up", len(added) - downs)) if count]
    return text + (", extended " + " and ".join(moves) if moves else "")


def ranked(results):
    """Optimizers by mean final eval loss (those with no finite report run last)."""
    return sorted(results, key=lambda r: _finite_or_inf(r["mean"]))


def report(results, target, target_source, config, baseline, seeds, seeds_at_best):
    """The markdown report (see the module docstring)."""
    first = results[0]
    lines = [
        "# Optimizer race", "",
        f"Workload: byte-level LM, {first['params']:,} params, {config.steps} steps of "
        f"{config.grad_accum * config.batch_size} x {config.seq_len} tokens, schedule "
        f"{config.schedule.name}, {jax.device_count()} x {jax.devices()[0].device_kind}. "
        f"lr picked by {seeds} seed(s) per lr; numbers below from {seeds_at_best} other "
        "seeds at the best lr.",
        f"Target eval loss: {target:.4f} ({target_source}).", "",
        "| optimizer | best lr | final eval loss (95% CI) | n | p vs "
        f"{baseline} | reached target | median steps to target | s / step "
        "| s to target | state MiB | grid |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ranked(results):
        loss = (f"{_fmt(r['mean'], '.4f')} ± {_fmt(r['half'], '.4f')}"
                if math.isfinite(r["mean"]) else "diverged")
        n = f"{r['n']}" + (f" (+{r['diverged']} diverged)" if r["diverged"] else "")
        seconds = r["median_steps"] * r["seconds_per_step"]
        lines.append(
            f"| {r['optimizer']} | {r['best_lr']:.3g}{'*' if r['at_edge'] else ''} | {loss} "
            f"| {n} | {_fmt(r['p'], '.3g')} | {r['reached']} of {r['runs']} "
            f"| {_fmt(r['median_steps'], '.0f')} | {_fmt(r['seconds_per_step'], '.4f')} "
            f"| {_fmt(seconds, '.2f')} | {r['state_bytes'] / 2**20:.2f} | {_grid_note(r)} |")
    extended = [r["optimizer"] for r in results if r["added"]]
    lines += [
        "", "Final eval loss: mean ± half width of the 95% Student-t interval over the report "
        "seeds (diverged runs left out, counted in n). p: two-sided paired t-test against "
        f"{baseline} (same seeds: same initial params and data order). Steps to target: "
        "linearly interpolated between evals, median over the runs that reached it; seconds "
        "to target = that x s / step, one run trained alone (compilation excluded). *: the "
        "best lr is still at an edge of the grid (--max_lr_points reached).",
        "Grids extended past an edge: " + (", ".join(extended) if extended else "none") + ".",
        "", "## Every run", "",
        "| optimizer | lr | seed | role | final eval loss | metrics |", "|---|---|---|---|---|---|"]
    for r in results:
        for role, records in (("select", r["selection"]), ("report", r["reported"])):
            for run, record in sorted(records.items()):
                loss = "diverged" if record["diverged"] else _fmt(record["final_eval_loss"],
                                                                  ".4f")
                lines.append(f"| {r['optimizer']} | {run.lr:.3g} | {run.seed} | {role} | "
                             f"{loss} | {RUNS_DIR}/{r['optimizer']}/{run.key}.jsonl |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib  # here, not at the top: a bad flag should fail without loading it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def mean_curve(runs):
    """(steps, mean, std) of the eval curves of the finite runs (same eval steps)."""
    curves = [run["curve"] for run in runs if not run["diverged"]]
    if not curves:
        return None
    steps = np.array([step for step, _ in curves[0]], float)
    losses = np.array([[loss for _, loss in curve] for curve in curves], float)
    return steps, losses.mean(0), losses.std(0, ddof=1) if len(curves) > 1 else 0 * steps


def plot_curves(results, target, path):
    """Mean eval loss ±1 std over the report seeds at each optimizer's best lr, against step
    and against seconds (steps x s / step of one run alone)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in ranked(results):
        curve = mean_curve(r["best_runs"])
        if curve is None:
            continue
        steps, mean, std = curve
        label = f"{r['optimizer']} (lr {r['best_lr']:.3g}, n={r['n']})"
        for ax, x in ((axes[0], steps), (axes[1], steps * r["seconds_per_step"])):
            (line,) = ax.plot(x, mean, "-", label=label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    finite = [r["mean"] for r in results if math.isfinite(r["mean"])]
    for ax, xlabel in zip(axes, ("step", "seconds (training only, one run alone)")):
        ax.axhline(target, color="gray", linestyle=":", label="target")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if finite:
            ax.set_ylim(min(finite) - 0.2, max(finite) + 1.0)
    axes[0].set_ylabel("eval loss (nats / byte), mean ± 1 std")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_sensitivity(results, path):
    """Final eval loss against lr for each optimizer: mean ± 1 std over every seed at that
    lr (selection and report seeds); diverged lrs marked x on the top edge."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max((run["final_eval_loss"] for r in results
               for run in {**r["selection"], **r["reported"]}.values()
               if math.isfinite(run["final_eval_loss"])), default=1.0)
    for r in results:
        by_lr = {}
        for run, record in {**r["selection"], **r["reported"]}.items():
            by_lr.setdefault(run.lr, []).append(record)
        lrs = sorted(by_lr)
        means, stds, bad = [], [], []
        for lr in lrs:
            losses = race_stats.finite([rec["final_eval_loss"] for rec in by_lr[lr]])
            means.append(statistics.fmean(losses) if losses else math.nan)
            stds.append(statistics.stdev(losses) if len(losses) > 1 else 0.0)
            if not losses:
                bad.append(lr)
        bars = ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=r["optimizer"])
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=bars[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final eval loss (mean ± 1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    base = cli.flag_value(_CONFIG)
    workdir = _WORKDIR.value
    if not workdir:
        cli.fail("--workdir is required")
    with contextlib.ExitStack() as stack, cli.usage_errors():
        check_base(base)
        lrs, max_points, baseline, hparams = validate_flags(
            _OPTIMIZERS.value, _LRS.value, _LR_POINTS.value, _LR_SPACING.value, _TARGET.value,
            _EVALS.value, _HPARAMS.value, _MAX_LR_POINTS.value, _SEEDS.value,
            _SEEDS_AT_BEST.value, _BASELINE.value, _RUNS_PER_PROGRAM.value)
        # Every optimizer's config is checked before the first run starts; the corpus,
        # mesh and model once.
        configs = [run_config(base, name, optim.spec(name).centre_lr, hparams[name],
                              _EVALS.value) for name in _OPTIMIZERS.value]
        for config in configs:
            sweep.check_config(config)
        corpus = setup.setup(configs[0]).corpus
        stack.enter_context(claim_workdir(workdir, base, _EVALS.value, hparams, corpus))
        holder = stack.pop_all()  # the lock outlives the set-up's error handling
    with holder:
        run_race(base, workdir, lrs, max_points, baseline, hparams)


def run_race(base, workdir, lrs, max_points, baseline, hparams):
    """The race of `main`'s flags in `workdir` (held), its report, plots and printout."""
    mode = _SWEEP.value or default_sweep_mode()
    results, target, source = race(
        base, _OPTIMIZERS.value, workdir, lrs=lrs, points=_LR_POINTS.value,
        spacing=_LR_SPACING.value, max_points=max_points, seeds=_SEEDS.value,
        seeds_at_best=_SEEDS_AT_BEST.value, baseline=baseline, target=_TARGET.value,
        mode=mode, runs_per_program=_RUNS_PER_PROGRAM.value, hparams=hparams,
        evals=_EVALS.value)
    text = report(results, target, source, base, baseline, _SEEDS.value, _SEEDS_AT_BEST.value)
    _write_atomic(os.path.join(workdir, REPORT_FILE), text)
    plot_curves(results, target, os.path.join(workdir, CURVES_FILE))
    plot_sensitivity(results, os.path.join(workdir, SENSITIVITY_FILE))
    print(text)
    print(f"race: report in {os.path.join(workdir, REPORT_FILE)}, curves in "
          f"{os.path.join(workdir, CURVES_FILE)} and "
          f"{os.path.join(workdir, SENSITIVITY_FILE)}")


def run_script():
    """`ravine-race` / `python -m ravine.experiments.race`."""
    cli.run(main)


if __name__ == "__main__":
    run_script()
