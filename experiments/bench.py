r"""The benchmark: optimizers tuned with equal budgets on many workloads, AlgoPerf-style scores.

    ravine-bench --preset=smoke --workdir=runs/bench          # ~40 s on 2 CPU cores
    ravine-bench --preset=default --workdir=runs/bench_default
        # 5 workloads x 5 optimizers x 5 trials x 3 studies: 10 min 18 s on 2 CPU cores
        # (2026-12-06); scores SOAP 0.973, Muon 0.802, AdamW 0.486, Schedule-Free 0.171,
        # Lion 0 (docs/benchmarks/bench_default/report.md)
    python -m ravine.experiments.bench --preset=default --workdir=runs/bench \
        --optimizers=adamw,lion,muon --trials=5 --studies=3
    ravine-bench --preset=scale --workdir=runs/scale    # the ladder, + speedup against size

What it does, per workload of the suite (`experiments.workloads`) and per optimizer:

1. Equal tuning budgets. Each optimizer gets the same N quasi-random trials (`--trials`) in
   each of S studies (`--studies`): points of a scrambled Halton sequence (scipy; seeded by
   the study, so every optimizer's study s draws from the same sequence) in its search
   space: peak learning rate (log-uniform over `centre_lr / f .. centre_lr * f` around
   `optim.spec(name).centre_lr`, f = the preset's `lr_factor`), weight decay (where the
   factory takes `weight_decay`), the warmup fraction of a warmup-cosine schedule and b2
   (1 - b2 log-uniform, where the factory takes `b2`), plus the knobs the optimizer's spec
   declares (`optim.spec(name).search_space`, which may also override the ones above). The
   report prints every space and the budget. No per-optimizer setting lives here.
2. Shared programs. The trials of one (workload, optimizer) run side by side in ONE jitted,
   vmapped program: their hyperparameters are data (the factory is called inside the
   program with traced values; the lr as `lr * warmup_cosine_multiplier(step)`, also for a
   second `*_learning_rate`), each study's seed picks its initial params and data order, and
   a chunk of steps runs as one `lax.scan` followed by an evaluation. Knobs whose factory
   default is an int (Shampoo's `precondition_every`) are compile-time constants: trials
   are grouped by them, one program per value. The optimizer's integer step counters stay
   unbatched, as in the race's sweep, so a refresh `lax.cond` stays a cond. An optimizer
   whose spec is not `vmappable` (extra update arguments, Schedule-Free) runs trial by trial
   through one program with its hyperparameters still as data; one with a train step of its
   own (K-FAC) is skipped with one line. A workload without `batched_steps` (the conv net)
   runs every optimizer trial by trial and step by step (one compiled step per call). A
   `constant_lr` spec gets a constant lr and its warmup fraction goes to its own
   `warmup_hparam`.
3. Scores. Per workload a target: the workload's own, or the baseline's (`--baseline`,
   default adamw) median over studies of its best eval metric (the upper of the two middle
   values for an even S, so the baseline reaches it in more than half of its studies). Time
   to target of a study = the first evaluation step of its fastest trial at or below
   the target, inf if none; a workload's time = the median over studies; also in seconds
   (steps x measured seconds per step of one trial: the program's time / its trials).
   `scoring.algoperf_score` (r_max = 4) and `scoring.bootstrap_score` intervals over
   studies, `scoring.performance_profile` (DIR/performance_profile.png), the end-of-training
   metric of each study's best trial with a paired t-test against the baseline (studies
   share seeds), when the ranking settles (`scoring.ranking_stability`), and the tuning
   budget's curve: the expected best of k trials against k (`scoring.expected_best`, Dodge
   et al. 2019) with bootstrap bands (DIR/tuning_budget.png).

Outputs: DIR/results.json (everything the report is rendered from), DIR/report.md (printed),
DIR/performance_profile.png and DIR/tuning_budget.png. Resumable after SIGKILL: each
(workload, optimizer) result is written to DIR/runs/<workload>/<optimizer>.json atomically
when done and read back on a rerun with the same settings; a resumed run's report equals an
uninterrupted one's above its "Wall clock" section (the only place timings enter). Bad flags
exit 2 with one line.

Speedup against model size: `--preset=scale` also runs the scaling study's `speedup` study
(`ravine-scaling --what=speedup`, experiments/scaling_study.py: one implementation) on the
LM ladder's width rungs with the bench's optimizers and baseline, in DIR/speedup/ (its
runs.jsonl, resumable as the study is; its own report.md and results.json); its tables join
DIR/report.md above the wall clock, and DIR/speedup_vs_size.png is written.
"""
import contextlib
import inspect
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from matplotlib.figure import Figure
from scipy.stats import qmc

from ravine import optim
from ravine.experiments import race_stats, scaling_study, scoring, workloads
from ravine.experiments.runtime import cli, user_modules
from ravine.experiments.runtime import workdir as workdir_lib
from ravine.experiments.runtime.metrics import write_atomically
from ravine.experiments.runtime.state import shared_counters
from ravine.experiments.runtime.timing import matmul_flops_per_second

R_MAX = 4.0
BOOTSTRAP_RESAMPLES = 2000
RESULTS_FILE, REPORT_FILE, PROFILE_FILE = "results.json", "report.md", "performance_profile.png"
BUDGET_FILE = "tuning_budget.png"
SPEEDUP_FILE = scaling_study.FIGURES["speedup"]   # speedup_vs_size.png
RUNS_DIR, SPEEDUP_DIR = "runs", "speedup"
TIMING_HEADING = "## Wall clock"   # everything measured in seconds sits below it
FORMAT = 1                         # of the files under DIR/runs (a change makes them stale)

LR, WARMUP = "learning_rate", "warmup_fraction"
# The knobs every optimizer is tuned on where its factory takes them, beyond the lr. Scales:
# "log" (log-uniform), "linear", "log1m" (1 - value log-uniform: b2 from 0.9 to 0.999).
COMMON_KNOBS = {"weight_decay": (1e-5, 1e-1, "log"), "b2": (0.9, 0.999, "log1m")}
WARMUP_KNOB = (0.02, 0.2, "linear")


class Preset(NamedTuple):
    """A named suite and budget.

    Attributes:
      workloads, optimizers: names (`workloads.available()`, `optim.spec`).
      trials, studies: N quasi-random trials in each of S studies, per optimizer.
      evals: evaluations per trial (the time-to-target resolution is steps / evals).
      step_scale: fraction of each workload's step budget that is trained.
      lr_factor: the lr range is `centre_lr / lr_factor .. centre_lr * lr_factor`.
      about: what the preset is for.
      speedup: the scaling study's `speedup` preset to run too (in DIR/speedup/), with the
        bench's optimizers and baseline; None: none.
    """
    workloads: tuple
    optimizers: tuple
    trials: int
    studies: int
    evals: int
    step_scale: float
    lr_factor: float
    about: str
    speedup: str | None = None


PRESETS = {
    "smoke": Preset(
        ("noisy_quadratic", "digits_mlp", "lm_tiny"), ("adamw", "lion", "sgd"), trials=2,
        studies=2, evals=4, step_scale=0.05, lr_factor=10.0,
        about="a check that everything runs (the tests run it): 5% of each budget, 2 trials "
        "x 2 studies; its numbers say nothing about the optimizers"),
    "default": Preset(
        ("noisy_quadratic", "digits_mlp", "digits_cnn", "digits_autoencoder", "lm_small"),
        ("adamw", "lion", "muon", "soap", "schedule_free_adamw"), trials=5, studies=3,
        evals=20, step_scale=1.0, lr_factor=10.0,
        about="AlgoPerf's external-tuning budget (5 trials x 3 studies) on 5 workloads"),
    "scale": Preset(
        tuple(f"lm_{size}" for size in workloads.LM_LADDER), ("adamw", "muon", "soap"),
        trials=5, studies=2, evals=20, step_scale=1.0, lr_factor=10.0,
        about="the LM size ladder at 20 tokens per parameter, then the speedup against "
        "model size (the scaling study's `speedup` default preset)", speedup="default"),
}


def _flag(define, name, default, help_text):
    """Defines `--name` so that the jobs sharing its name can be imported in one process
    with it, in any order (the train job's --workdir, the race's --optimizers): a flag
    defined before is reused, and ours lets a later definition replace it. The bench reads
    a flag by name and only whether and how it was given (`_given`), never its default."""
    if name in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
    return define(name, default, help_text, allow_override=True)


user_modules.define_and_import([])   # --optimizer_module (imported in main, after parsing)
_PRESET = _flag(flags.DEFINE_string, "preset", "smoke", f"One of {', '.join(PRESETS)}.")
_SUITE = _flag(flags.DEFINE_list, "suite", None,
               "Workloads, comma-separated (default: the preset's).")
_OPTIMIZERS = _flag(flags.DEFINE_list, "optimizers", None,
                    "Optimizers, comma-separated (default: the preset's).")
_TRIALS = _flag(flags.DEFINE_integer, "trials", None,
                "Quasi-random trials per study and optimizer (default: the preset's).")
_STUDIES = _flag(flags.DEFINE_integer, "studies", None,
                 "Studies (independent tunings, seeds) per optimizer (default: the preset's).")
_BASELINE = _flag(flags.DEFINE_string, "baseline", None,
                  "Optimizer whose tuned result sets the targets (default: adamw if run, "
                  "else the first optimizer).")
_WORKDIR = _flag(flags.DEFINE_string, "workdir", None, "Output folder (required).")
_WORKLOAD_MODULE = _flag(flags.DEFINE_list, "workload_module", [],
                         "Modules that call workloads.register(...): names or .py paths.")


def _given(holder):
    """The flag's value when it was given on the command line, else None."""
    return holder.value if flags.FLAGS[holder.name].present else None


# ----------------------------------------------------------------------- the plan (flags)

class Plan(NamedTuple):
    """A validated benchmark: what to run and where."""
    workdir: str
    preset: str
    workloads: tuple
    optimizers: tuple
    skipped: dict          # optimizer -> why it is not run
    trials: int
    studies: int
    evals: int
    step_scale: float
    lr_factor: float
    baseline: str
    speedup: Any = None    # the scaling study's Plan of the speedup study, or None


def _positive_int(flag, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise cli.UsageError(f"--{flag} must be an integer >= 1, got {value!r}")
    return value


def make_plan(workdir, preset="smoke", suite=None, optimizers=None, trials=None, studies=None,
              baseline=None) -> Plan:
    """Validates the flags' values (None: the preset's) into a `Plan`.

    Raises:
      cli.UsageError: naming the bad value (missing workdir, unknown preset, workload or
        optimizer, trials or studies < 1, a baseline not benchmarked, a bad search space).
    """
    if not workdir:
        raise cli.UsageError("--workdir is required")
    if preset not in PRESETS:
        raise cli.UsageError(f"unknown --preset {preset!r}; known: {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    names = tuple(suite) if suite else chosen.workloads
    known = workloads.available()
    for name in names:
        if name not in known:
            raise cli.UsageError(f"unknown workload {name!r} in --suite; known: "
                                 f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise cli.UsageError(f"--suite names a workload twice: {','.join(names)}")
    wanted = tuple(optimizers) if optimizers else chosen.optimizers
    runnable, skipped = [], {}
    for name in wanted:
        try:
            spec = optim.spec(name)
        except ValueError:
            raise cli.UsageError(f"unknown optimizer {name!r} in --optimizers; known: "
                                 f"{', '.join(s.name for s in optim.specs())}") from None
        if not spec.is_transform:
            skipped[name] = ("it brings its own train step (not an Optax transform); the "
                             "benchmark's shared programs drive Optax transforms only")
            continue
        try:
            search_space(name, chosen.lr_factor)
        except ValueError as error:   # a spec knob its factory does not take
            raise cli.UsageError(str(error)) from None
        runnable.append(name)
    if len(set(wanted)) != len(wanted):
        raise cli.UsageError(f"--optimizers names an optimizer twice: {','.join(wanted)}")
    if not runnable:
        raise cli.UsageError(f"no optimizer to run in --optimizers={','.join(wanted)} "
                             f"({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    trials = _positive_int("trials", chosen.trials if trials is None else trials)
    studies = _positive_int("studies", chosen.studies if studies is None else studies)
    if baseline is None:
        baseline = "adamw" if "adamw" in runnable else runnable[0]
    elif baseline not in runnable:
        raise cli.UsageError(f"--baseline {baseline!r} is not among the optimizers run "
                             f"({', '.join(runnable)})")
    speedup = None
    if chosen.speedup:   # its own checks: the optimizers it can train, its ladder
        speedup = scaling_study.make_plan("speedup", chosen.speedup,
                                          os.path.join(workdir, SPEEDUP_DIR),
                                          optimizer=baseline, optimizers=tuple(runnable))
    return Plan(workdir=workdir, preset=preset, workloads=names, optimizers=tuple(runnable),
                skipped=skipped, trials=trials, studies=studies, evals=chosen.evals,
                step_scale=chosen.step_scale, lr_factor=chosen.lr_factor, baseline=baseline,
                speedup=speedup)


# -------------------------------------------------------------------------- search spaces

def _factory_params(name):
    return inspect.signature(optim.factory(name)).parameters


def search_space(name, lr_factor=10.0) -> dict:
    """`{knob: (low, high, scale)}` of optimizer `name`, in Halton-dimension order: the lr
    around its spec's `centre_lr`, weight decay / warmup fraction / b2 where they apply, then
    its spec's own `search_space` (which overrides a common knob of the same name).

    Raises:
      ValueError: a spec knob that the factory does not take.
    """
    spec = optim.spec(name)
    params = _factory_params(name)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    space = {LR: (spec.centre_lr / lr_factor, spec.centre_lr * lr_factor, "log")}
    if "weight_decay" in params:
        space["weight_decay"] = COMMON_KNOBS["weight_decay"]
    if not spec.constant_lr or spec.warmup_hparam:
        space[WARMUP] = WARMUP_KNOB
    if "b2" in params:
        space["b2"] = COMMON_KNOBS["b2"]
    for knob, bounds in spec.search_space.items():
        if knob not in params and not takes_any:
            raise ValueError(f"search_space of optimizer {name!r} names {knob!r}, which its "
                             f"factory does not take ({', '.join(params)})")
        space[knob] = tuple(bounds)
    return space


def static_knobs(name, space) -> list:
    """The knobs that are compile-time constants: those whose factory default is an int
    (rounded to one); the others are traced data."""
    params = _factory_params(name)
    return [k for k in space if k in params and isinstance(params[k].default, int)
            and not isinstance(params[k].default, bool)]


def _scale(u, low, high, scale):
    if scale == "log":
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    if scale == "log1m":   # 1 - value log-uniform between 1 - high and 1 - low
        lo, hi = math.log(1 - high), math.log(1 - low)
        return 1.0 - math.exp(lo + u * (hi - lo))
    return low + u * (high - low)


def sample_trials(space, trials, study) -> list:
    """`trials` points of a scrambled Halton sequence (seeded by `study`) in `space`."""
    points = qmc.Halton(d=len(space), scramble=True, seed=study).random(trials)
    return [{knob: _scale(float(u), *bounds) for u, (knob, bounds) in zip(row, space.items())}
            for row in points]


def budget(steps, evals, step_scale):
    """(steps trained, steps between evals): `step_scale` of `steps`, a multiple of evals."""
    every = max(1, round(steps * step_scale / evals))
    return every * evals, every


# ---------------------------------------------------------------------- one trial's maths

def warmup_cosine_multiplier(step, warmup_steps, total_steps):
    """`optim.schedules.warmup_cosine(1.0, total_steps, warmup_steps)(step)` for a traced
    `warmup_steps`: a linear ramp from 0, then the schedule's half cosine from 1 to 0.1,
    evaluated on the post-warmup progress."""
    decay = optim.schedules.warmup_cosine(1.0, total_steps)
    t = jnp.asarray(step, jnp.float32)
    w = jnp.asarray(warmup_steps, jnp.float32)
    after = decay(total_steps * (t - w) / jnp.maximum(total_steps - w, 1.0))
    return jnp.where(t < w, t / jnp.maximum(w, 1.0), after)


def fixed_hparams(name, space):
    """The spec's `race_hparams` that are not tuned (fixed for every trial)."""
    return {k: v for k, v in optim.spec(name).race_hparams.items() if k not in space}


def make_optimizer(name, hparams, total_steps):
    """One trial's optimizer: `optim.factory(name)` called with `hparams` (traced or not)."""
    spec = optim.spec(name)
    hparams = dict(hparams)
    warmup = hparams.pop(WARMUP, None)
    if spec.constant_lr:
        multiplier = None
        if warmup is not None and spec.warmup_hparam:
            hparams[spec.warmup_hparam] = jnp.maximum(1.0, jnp.round(warmup * total_steps))
    else:
        warmup_steps = 0.0 if warmup is None else jnp.round(warmup * total_steps)

        def multiplier(count):
            return warmup_cosine_multiplier(count, warmup_steps, total_steps)

    kwargs = {}
    for knob, value in hparams.items():
        if multiplier is not None and (knob == LR or knob.endswith("_" + LR)) \
                and not callable(value):
            kwargs[knob] = lambda count, peak=value: peak * multiplier(count)
        else:
            kwargs[knob] = value
    return spec.factory(**kwargs)


class TrialFns(NamedTuple):
    init: Any       # (params, hparams) -> opt_state
    step: Any       # (params, opt_state, batch, hparams, seed, step) -> (params, opt_state, loss)
    evaluate: Any   # (params, opt_state) -> metric


def _no_logits(workload):
    def logits_fn(params, batch):
        raise ValueError(f"workload {workload.name!r} has no logits_fn")
    return logits_fn


def trial_fns(workload, name, static, total_steps) -> TrialFns:
    """A single trial's init, step and eval; `static` are the compile-time hyperparameters
    (and the spec's fixed ones), the traced ones come as the `hparams` argument."""
    spec = optim.spec(name)

    def make(hparams):
        return make_optimizer(name, {**static, **hparams}, total_steps)

    def init(params, hparams):
        return make(hparams).init(params)

    def step(params, opt_state, batch, hparams, seed, index):
        loss, grads = jax.value_and_grad(workload.loss_fn)(params, batch)
        extra = {}
        if spec.update_args is not None:
            task = optim.TrainTask(
                loss_fn=workload.loss_fn, logits_fn=workload.logits_fn or _no_logits(workload),
                examples_per_step=workload.examples_per_step or workload.batch_size,
                key=jax.random.key(seed))
            extra = spec.update_args({**static, **hparams}, task)(params, batch, index)
        updates, opt_state = make(hparams).update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    def evaluate(params, opt_state):
        point = spec.eval_params(params, opt_state) if spec.eval_params else params
        return jnp.asarray(workload.eval(point), jnp.float32)

    return TrialFns(init, step, evaluate)


# ------------------------------------------------------------- a group of trials, compiled

class Program:
    """The compiled programs of a group of trials of one (workload, optimizer, static knobs):
    `init` (the optimizer states) and `chunk` (a `lax.scan` of `every` steps, then an
    evaluation). There is no evaluation at step 0: every optimizer starts from the same
    params, and a target is never reached at step 0.

    `vectorized`: the trials side by side under `jax.vmap` (every array with a leading trial
    axis, the integer step counters unbatched); else a single trial, no trial axis.
    `scanned`: `chunk` is one program; else (`Workload.batched_steps` False) it calls one
    compiled step `every` times, then a compiled evaluation.
    """

    def __init__(self, workload, name, static, total_steps, every, vectorized,
                 example_params, example_hparams, scanned=True):
        self.vectorized, self.every, self.scanned = vectorized, every, scanned
        fns = trial_fns(workload, name, static, total_steps)
        abstract = jax.eval_shape(fns.init, example_params, example_hparams)
        mask = shared_counters(abstract)
        axes = jax.tree.map(lambda shared: None if shared else 0, mask)
        if vectorized:
            def init(params, hparams):
                state = jax.vmap(fns.init)(params, hparams)
                return jax.tree.map(lambda leaf, s: leaf[0] if s else leaf, state, mask)

            def step(params, opt_state, batch, hparams, seeds, index):
                params, new, loss = jax.vmap(fns.step, in_axes=(0, axes, 0, 0, 0, None))(
                    params, opt_state, batch, hparams, seeds, index)
                new = jax.tree.map(lambda leaf, s: leaf.max(0) if s else leaf, new, mask)
                return params, new, loss

            evaluate = jax.vmap(fns.evaluate, in_axes=(0, axes))
        else:
            init, step, evaluate = fns

        def one_step(carry, batch, hparams, seeds, index):
            params, opt_state, loss = step(*carry, batch, hparams, seeds, index)
            return (params, opt_state), loss

        def chunk(carry, batches, hparams, seeds, start):
            indices = start + jnp.arange(every, dtype=jnp.int32)
            carry, losses = jax.lax.scan(
                lambda carry, xs: one_step(carry, xs[0], hparams, seeds, xs[1]), carry,
                (batches, indices))
            return carry, losses.mean(0), evaluate(*carry)

        self.init = jax.jit(init)
        if scanned:
            self._jitted = (jax.jit(chunk, donate_argnums=(0,)),)
        else:
            self._jitted = (jax.jit(one_step, donate_argnums=(0,)),
                            jax.jit(lambda carry: evaluate(*carry)))
        self._compiled = None
        self.compile_seconds = 0.0

    def compile(self, carry, batches, hparams, seeds, start):
        """Compiles the chunk's program(s) for these argument shapes (once; timed in
        `compile_seconds`)."""
        if self._compiled is None:
            began = time.perf_counter()
            if self.scanned:
                (chunk,) = self._jitted
                self._compiled = (chunk.lower(carry, batches, hparams, seeds, start).compile(),)
            else:
                step, evaluate = self._jitted
                batch = jax.tree.map(lambda leaf: leaf[0], batches)
                self._compiled = (step.lower(carry, batch, hparams, seeds, start).compile(),
                                  evaluate.lower(carry).compile())
            self.compile_seconds = time.perf_counter() - began

    def chunk(self, carry, batches, hparams, seeds, start):
        """`every` steps of every trial, then an evaluation: (carry, mean losses, metrics)."""
        self.compile(carry, batches, hparams, seeds, start)
        if self.scanned:
            return self._compiled[0](carry, batches, hparams, seeds, start)
        step, evaluate = self._compiled
        losses = []
        for i in range(self.every):
            batch = jax.tree.map(lambda leaf: leaf[i], batches)   # noqa: B023 - used at once
            carry, loss = step(carry, batch, hparams, seeds, np.int32(start + i))
            losses.append(loss)
        return carry, jnp.mean(jnp.stack(losses), 0), evaluate(carry)


def _stack(trees):
    return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


class PairRunner:
    """Trains every trial of one (workload, optimizer): groups, programs, curves, timing."""

    def __init__(self, workload, name, plan, initial_params):
        self.workload, self.name, self.plan = workload, name, plan
        self.initial_params = initial_params     # seed -> params (shared across optimizers)
        self.steps, self.every = budget(workload.steps, plan.evals, plan.step_scale)
        self.space = search_space(name, plan.lr_factor)
        self.static = static_knobs(name, self.space)
        self.fixed = fixed_hparams(name, self.space)
        self.vectorized = optim.spec(name).vmappable and workload.batched_steps
        self.programs = {}

    def trials(self):
        """Every (study, trial) with its hyperparameters (static ones rounded)."""
        out = []
        for study in range(self.plan.studies):
            for i, hp in enumerate(sample_trials(self.space, self.plan.trials, study)):
                hp = {k: (int(round(v)) if k in self.static else v) for k, v in hp.items()}
                out.append({"study": study, "trial": i, "seed": study, "hparams": hp})
        return out

    def groups(self, trials):
        """Trials sharing a program: same static knobs (all of them when vectorized, else
        one trial per group)."""
        by_static = {}
        for t in trials:
            key = tuple(t["hparams"][k] for k in self.static)
            by_static.setdefault(key, []).append(t)
        if self.vectorized:
            return list(by_static.values())
        return [[t] for group in by_static.values() for t in group]

    def _program(self, static_values, n_trials, params, hparams):
        """The program of `n_trials` trials with these static knobs (made once); `params`
        and `hparams` are one trial's (shapes only)."""
        key = (static_values, n_trials)
        if key not in self.programs:
            static = {**self.fixed, **dict(zip(self.static, static_values))}
            self.programs[key] = Program(self.workload, self.name, static, self.steps,
                                         self.every, self.vectorized, params, hparams,
                                         scanned=self.workload.batched_steps)
        return self.programs[key]

    def _batches(self, seeds, start):
        """[every, (trials,) ...] training batches of steps start .. start + every."""
        steps = range(start, start + self.every)
        per_seed = {s: _stack([self.workload.batch(s, i) for i in steps]) for s in set(seeds)}
        if not self.vectorized:
            return per_seed[seeds[0]]
        return jax.tree.map(lambda *leaves: np.stack(leaves, axis=1),
                            *[per_seed[s] for s in seeds])

    def run_group(self, group):
        """Trains `group` in one program; returns (curves, final train losses, seconds of
        training: the chunks' wall time, compilation and the first call excluded, scaled
        to all of the steps)."""
        traced = [k for k in self.space if k not in self.static]
        seeds = [t["seed"] for t in group]
        static_values = tuple(group[0]["hparams"][k] for k in self.static)
        one_params = self.initial_params(seeds[0])
        one_hparams = {k: np.float32(group[0]["hparams"][k]) for k in traced}
        if self.vectorized:
            params = _stack([self.initial_params(s) for s in seeds])
            hparams = {k: np.array([t["hparams"][k] for t in group], np.float32)
                       for k in traced}
            seed_arg = np.array(seeds, np.int32)
        else:
            params, hparams, seed_arg = one_params, one_hparams, np.int32(seeds[0])
        program = self._program(static_values, len(group), one_params, one_hparams)
        carry = jax.device_put((params, program.init(params, hparams)))  # donated below
        curves = [[] for _ in group]
        losses, seconds = None, []
        for start in range(0, self.steps, self.every):
            batches = self._batches(seeds, start)
            program.compile(carry, batches, hparams, seed_arg, np.int32(start))
            began = time.perf_counter()
            carry, losses, metrics = program.chunk(carry, batches, hparams, seed_arg,
                                                   np.int32(start))
            metrics = np.atleast_1d(np.asarray(metrics))   # waits for the chunk
            seconds.append(time.perf_counter() - began)
            for curve, metric in zip(curves, metrics):
                curve.append((start + self.every, metric))
        # The first call of a freshly loaded program is slower: time the others (x chunks).
        timed = seconds[1:] or seconds
        return curves, np.atleast_1d(np.asarray(losses)), sum(timed) * len(seconds) / len(timed)

    def run(self, log=print):
        """Every trial; returns the pair's result dict (see `bench` module docstring)."""
        began = time.perf_counter()
        trials = self.trials()
        seconds = 0.0
        try:
            for group in self.groups(trials):
                curves, losses, group_seconds = self.run_group(group)
                seconds += group_seconds
                for trial, curve, loss in zip(group, curves, losses, strict=True):
                    trial["curve"] = [[step, _finite_or_none(m)] for step, m in curve]
                    trial["final_train_loss"] = _finite_or_none(loss)
                    trial["diverged"] = any(m is None for _, m in trial["curve"]) or \
                        trial["final_train_loss"] is None
        except (ValueError, TypeError, NotImplementedError) as error:
            # raised while tracing: the optimizer cannot run on this workload (Sophia's
            # GNB estimate on a workload without logits); its trials count as misses
            reason = cli.one_line(f"{type(error).__name__}: {error}")
            log(f"bench: {self.workload.name} / {self.name}: cannot run: {reason}")
            return {"workload": self.workload.name, "optimizer": self.name,
                    "settings": self.settings(), "trials": [], "error": reason,
                    "vectorized": self.vectorized, "programs": 0, "run_seconds": 0.0,
                    "compile_seconds": 0.0, "wall_seconds": time.perf_counter() - began,
                    "seconds_per_step": None}
        n = len(trials)
        compile_seconds = sum(p.compile_seconds for p in self.programs.values())
        wall = time.perf_counter() - began
        mode = ("vmap" if self.vectorized else "one by one") + \
            ("" if self.workload.batched_steps else ", step by step")
        log(f"bench: {self.workload.name} / {self.name}: {n} trials in {len(self.programs)} "
            f"program(s) ({mode}), {self.steps} steps, {wall:.1f} s (compile "
            f"{compile_seconds:.1f} s)")
        return {"workload": self.workload.name, "optimizer": self.name,
                "settings": self.settings(), "trials": trials,
                "vectorized": self.vectorized, "programs": len(self.programs),
                "run_seconds": seconds, "compile_seconds": compile_seconds,
                "wall_seconds": wall, "seconds_per_step": seconds / (self.steps * n)}

    def settings(self):
        """What a saved result must match to be read back (as JSON gives it back)."""
        return json.loads(json.dumps({
            "format": FORMAT, "steps": self.steps, "every": self.every,
            "trials": self.plan.trials, "studies": self.plan.studies, "space": self.space,
            "static": self.static, "fixed": self.fixed}))


def model_flops_per_step(workload):
    """XLA's FLOP count of one trial's loss and gradient on one batch (the model's work per
    step, the optimizer's left out), from the lowered program; None where unavailable."""
    params = jax.eval_shape(workload.init, jax.random.key(0))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                         workload.batch(0, 0))
    try:
        cost = jax.jit(jax.value_and_grad(workload.loss_fn)).lower(params, batch).cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without a cost model
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ------------------------------------------------------------------------ the whole study

def pair_path(workdir, workload, optimizer):
    return os.path.join(workdir, RUNS_DIR, workload, f"{optimizer}.json")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _workload(name):
    try:
        return workloads.get(name)
    except ValueError as error:   # a user's factory that fails is a bad --suite
        raise cli.UsageError(f"workload {name!r} cannot be built: {error}") from None


def run_benchmark(plan, log=print) -> dict:
    """Runs (or reads back) every (workload, optimizer) of `plan`; returns the results dict
    that `results.json` holds and the report is rendered from.

    Raises:
      cli.UsageError: before anything is trained, when DIR/runs holds a result with other
        settings (trials, studies, steps, search space), naming its file.
    """
    runners, infos = {}, {}
    for w in plan.workloads:
        workload = _workload(w)
        steps, every = budget(workload.steps, plan.evals, plan.step_scale)
        infos[w] = {"description": workload.description, "n_params": workload.n_params,
                    "steps": steps, "budget_steps": workload.steps, "every": every,
                    "batch_size": workload.batch_size, "data": workload.data,
                    "metric": workload.metric, "target": workload.target,
                    "model_flops_per_step": model_flops_per_step(workload),
                    "batched_steps": workload.batched_steps}
        cache, init = {}, jax.jit(workload.init)

        def initial_params(seed, cache=cache, init=init):  # one per study seed, shared
            if seed not in cache:
                cache[seed] = jax.device_get(init(jax.random.key(seed)))
            return cache[seed]

        for o in plan.optimizers:
            runner = runners[w, o] = PairRunner(workload, o, plan, initial_params)
            path = pair_path(plan.workdir, w, o)
            if os.path.exists(path):
                try:
                    saved = _read_json(path)["settings"]
                except (OSError, ValueError, KeyError) as error:
                    raise cli.UsageError(f"{path} cannot be read back ({error}); remove it") \
                        from None
                if saved != runner.settings():
                    changed = sorted(k for k in set(saved) | set(runner.settings())
                                     if saved.get(k) != runner.settings().get(k))
                    raise cli.UsageError(
                        f"{path} holds a result with other settings ({', '.join(changed)}); "
                        "rerun with its flags, remove it, or use another --workdir")
    pairs = {w: {} for w in plan.workloads}
    for (w, o), runner in runners.items():
        path = pair_path(plan.workdir, w, o)
        if os.path.exists(path):
            log(f"bench: {w} / {o}: read back from {path}")
            pairs[w][o] = _read_json(path)
            continue
        result = runner.run(log)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, json.dumps(result))
        pairs[w][o] = result
    speedup = None
    if plan.speedup is not None:
        os.makedirs(plan.speedup.workdir, exist_ok=True)
        study, _ = scaling_study.run_study(plan.speedup, log)
        # every number of its report; the runs' curves stay in DIR/speedup/
        speedup = {**{k: v for k, v in study.items() if k != "runs"},
                   "workdir": plan.speedup.workdir}
    return {"preset": plan.preset, "about": PRESETS[plan.preset].about,
            "trials": plan.trials, "studies": plan.studies,
            "evals": plan.evals, "step_scale": plan.step_scale, "lr_factor": plan.lr_factor,
            "baseline": plan.baseline, "workloads": infos, "optimizers": list(plan.optimizers),
            "skipped": dict(plan.skipped),
            "spaces": {o: {k: list(v) for k, v in search_space(o, plan.lr_factor).items()}
                       for o in plan.optimizers},
            "static": {o: static_knobs(o, search_space(o, plan.lr_factor))
                       for o in plan.optimizers},
            "pairs": pairs, "device": f"{jax.devices()[0].device_kind}",
            "matmul_flops_per_second": matmul_flops_per_second(), "speedup": speedup}


# ----------------------------------------------------------------------------- the scores

def _metric(value):
    return math.inf if value is None else value


def trial_bests(pair):
    """Per trial: the best eval metric it reached (inf if none finite)."""
    return [min((_metric(m) for _, m in t["curve"]), default=math.inf)
            for t in pair["trials"]]


def study_bests(pair, studies):
    """Per study: the best eval metric any trial reached (inf if none finite)."""
    best = [math.inf] * studies
    for t, trial_best in zip(pair["trials"], trial_bests(pair)):
        best[t["study"]] = min(best[t["study"]], trial_best)
    return best


def study_times(pair, target, studies):
    """Per study: the first eval step of its fastest trial at or below `target`."""
    times = [math.inf] * studies
    if not math.isfinite(target):
        return times
    for t in pair["trials"]:
        hit = next((step for step, m in t["curve"] if _metric(m) <= target),
                   math.inf)
        times[t["study"]] = min(times[t["study"]], hit)
    return times


def tuned_trials(pair, studies):
    """Per study: the trial with the best final eval metric."""
    best = [None] * studies
    for t in pair["trials"]:
        final = _metric(t["curve"][-1][1])
        if best[t["study"]] is None or final < _metric(best[t["study"]]["curve"][-1][1]):
            best[t["study"]] = t
    return best


def summarize(results) -> dict:
    """Targets, times to target, scores, end-of-training metrics and ranking stability."""
    S, base = results["studies"], results["baseline"]
    opts, wls = results["optimizers"], list(results["workloads"])
    pairs = results["pairs"]
    targets, sources = {}, {}
    for w in wls:
        given = results["workloads"][w]["target"]
        if given is not None:
            targets[w], sources[w] = float(given), "the workload's own target"
        else:
            bests = sorted(study_bests(pairs[w][base], S))
            targets[w] = bests[S // 2]
            sources[w] = (f"{base}'s best per study, median over {S} studies"
                          + (" (upper middle)" if S % 2 == 0 else ""))
    steps = {o: {w: study_times(pairs[w][o], targets[w], S) for w in wls} for o in opts}
    seconds = {o: {w: [t * pairs[w][o]["seconds_per_step"] if math.isfinite(t) else math.inf
                       for t in steps[o][w]] for w in wls} for o in opts}
    out = {"targets": targets, "target_sources": sources}
    for unit, per_study in (("steps", steps), ("seconds", seconds)):
        medians = {o: {w: float(np.median(v)) for w, v in row.items()}
                   for o, row in per_study.items()}
        out[unit] = {"study_times": per_study, "times": medians,
                     "scores": scoring.algoperf_score(medians, R_MAX),
                     "intervals": scoring.bootstrap_score(
                         per_study, R_MAX, num_resamples=BOOTSTRAP_RESAMPLES, seed=0)}
    final, best_hparams = {}, {}
    for w in wls:
        final[w], best_hparams[w] = {}, {}
        for o in opts:
            tuned = [t for t in tuned_trials(pairs[w][o], S) if t is not None]
            final[w][o] = [_metric(t["curve"][-1][1]) for t in tuned] or [math.inf] * S
            best = min(tuned, key=lambda t: _metric(t["curve"][-1][1]), default=None)
            best_hparams[w][o] = best["hparams"] if best else {}
    out["final"], out["best_hparams"] = final, best_hparams
    out["p_values"] = {w: {o: race_stats.paired_p_value(final[w][o], final[w][base])
                           for o in opts if o != base} for w in wls}
    out["stability"] = {w: _stability(pairs[w], opts, S) for w in wls}
    out["tuning_budget"] = {w: _tuning_budget(pairs[w], opts) for w in wls}
    return out


def _tuning_budget(pairs, opts):
    """Per optimizer the expected best of k trials drawn from its N x S trials, k = 1..N x S
    (`scoring.expected_best`), with a 95% bootstrap interval over its trials; a trial that
    never reached a finite metric counts as the worst best of any trial of the workload.
    None for an optimizer without trials (or a workload where no trial is finite)."""
    bests = {o: trial_bests(pairs[o]) for o in opts}
    finite = [b for o in opts for b in bests[o] if math.isfinite(b)]
    out = {}
    for o in opts:
        if not bests[o] or not finite:
            out[o] = None
            continue
        values = [b if math.isfinite(b) else max(finite) for b in bests[o]]
        ks = np.arange(1, len(values) + 1)
        low, high = scoring.bootstrap_expected_best(values, ks, BOOTSTRAP_RESAMPLES, seed=0)
        out[o] = {"ks": ks.tolist(), "expected": scoring.expected_best(values, ks).tolist(),
                  "low": low.tolist(), "high": high.tolist(),
                  "failed": sum(not math.isfinite(b) for b in bests[o])}
    return out


def _stability(pairs, opts, studies):
    """`scoring.ranking_stability` of the tuned trials (median over studies) at each eval;
    None with fewer than 2 optimizers or a non-finite metric."""
    if len(opts) < 2 or any("error" in pairs[o] for o in opts):
        return None
    tuned = {o: tuned_trials(pairs[o], studies) for o in opts}
    eval_steps = [step for step, _ in tuned[opts[0]][0]["curve"]]
    rankings = {}
    for i, step in enumerate(eval_steps):
        row = {o: float(np.median([_metric(t["curve"][i][1]) for t in tuned[o]]))
               for o in opts}
        if not all(math.isfinite(v) for v in row.values()):
            return None
        rankings[step] = row
    result = scoring.ranking_stability(rankings, rankings[eval_steps[-1]])
    return {"stable_from": result.stable_from, "last_step": eval_steps[-1],
            "taus": [None if math.isnan(x) else float(x) for x in result.taus]}


# ----------------------------------------------------------------------------- the report

def _fmt(value, spec=".4g"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None or math.isnan(value) else "inf"
    return format(value, spec)


def _knob(bounds):
    low, high, scale = bounds
    return f"{low:.3g} .. {high:.3g} ({scale})"


def render_report(results) -> str:
    """The markdown report of `results` (what `run_benchmark` returns)."""
    s = summarize(results)
    opts, wls, S, N = (results["optimizers"], list(results["workloads"]), results["studies"],
                       results["trials"])
    base = results["baseline"]
    lines = [
        "# Optimizer benchmark", "",
        f"Preset `{results['preset']}` ({results['about']}): {len(wls)} workloads x "
        f"{len(opts)} optimizers. Equal "
        f"tuning budget: every optimizer gets {N} quasi-random trials (scrambled Halton, "
        f"seeded by the study) x {S} studies = {N * S} training runs per workload; "
        f"{results['evals']} evaluations per run; {results['step_scale']:g} of each "
        f"workload's step budget; learning rates within {results['lr_factor']:g}x of each "
        f"spec's centre_lr. Targets from {base}.", ""]
    if results["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{o} ({why})" for o, why in
                                           results["skipped"].items()) + ".", ""]
    lines += ["## Workloads", "", "| workload | params | steps run (budget) | eval every | "
              "metric | target | description |", "|---|---|---|---|---|---|---|"]
    for w in wls:
        info = results["workloads"][w]
        lines.append(f"| {w} | {info['n_params']:,} | {info['steps']} ({info['budget_steps']})"
                     f" | {info['every']} | {info['metric']} | {_fmt(s['targets'][w])} "
                     f"({s['target_sources'][w]}) | {info['description']} |")
    lines += ["", "## Search spaces", "",
              "Per optimizer, from its spec (`optim.spec(name)`: `centre_lr`, `search_space`) "
              "and its factory's arguments; the warmup fraction sets a warmup-cosine "
              "schedule (or the spec's own warmup argument for a constant-lr optimizer). "
              "Static knobs are compile-time constants (one program per value).", "",
              "| optimizer | knob | range (scale) | static |", "|---|---|---|---|"]
    for o in opts:
        for knob, bounds in results["spaces"][o].items():
            lines.append(f"| {o} | {knob} | {_knob(bounds)} | "
                         f"{'yes' if knob in results['static'][o] else ''} |")
    lines += ["", "## Time to target (steps)", "",
              "Per study the first evaluation step of its fastest trial at or below the "
              "target; the median over studies (inf: missed in at least half); in brackets "
              f"the studies that reached it, of {S}.", "",
              "| workload | " + " | ".join(opts) + " |", "|---|" + "---|" * len(opts)]
    for w in wls:
        cells = []
        for o in opts:
            per = s["steps"]["study_times"][o][w]
            hits = sum(math.isfinite(t) for t in per)
            cells.append(f"{_fmt(s['steps']['times'][o][w], '.0f')} ({hits}/{S})")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    diverged = [f"{w} / {o}: {n} of {N * S}" for w in wls for o in opts
                if (n := sum(t["diverged"] for t in results["pairs"][w][o]["trials"]))]
    lines += ["", "Diverged trials (a non-finite loss or metric; they count as misses): "
              + ("; ".join(diverged) if diverged else "none") + "."]
    failed = [f"{w} / {o} ({results['pairs'][w][o]['error']})" for w in wls for o in opts
              if "error" in results["pairs"][w][o]]
    if failed:
        lines += ["", "Could not run (every study counts as a miss): " + "; ".join(failed)
                  + "."]
    lines += ["", "## Scores (time to target in steps)", "",
              f"AlgoPerf score B (r_max = {R_MAX:g}; 1 = fastest on every workload, 0 = never "
              f"within {R_MAX:g}x of the fastest) with a 95% bootstrap interval over studies "
              f"({BOOTSTRAP_RESAMPLES} resamples). The performance profiles are in "
              f"{PROFILE_FILE}.", "", "| optimizer | score | 95% interval |", "|---|---|---|"]
    for o in sorted(opts, key=lambda o: -s["steps"]["scores"][o]):
        iv = s["steps"]["intervals"][o]
        lines.append(f"| {o} | {iv.score:.3f} | {iv.low:.3f} .. {iv.high:.3f} |")
    lines += ["", "## End of training", "",
              "Final eval metric of each study's best trial (by that metric): the median over "
              f"studies, [min, max]; p: paired t-test against {base} over studies (they share "
              "seeds: initial params and data order).", "",
              "| workload | " + " | ".join(opts) + " |", "|---|" + "---|" * len(opts)]
    for w in wls:
        cells = []
        for o in opts:
            v = s["final"][w][o]
            p = "" if o == base else f", p {_fmt(s['p_values'][w][o], '.2g')}"
            cells.append(f"{_fmt(float(np.median(v)))} [{_fmt(min(v))}, {_fmt(max(v))}]{p}")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += ["", "## Ranking stability", "",
              "Kendall's tau between the ranking of the tuned trials (median over studies) at "
              "each evaluation and the final one; the step from which it stays >= 0.8.", "",
              "| workload | stable from step | tau at each eval |", "|---|---|---|"]
    for w in wls:
        st = s["stability"][w]
        if st is None:
            lines.append(f"| {w} | n/a (one optimizer or a non-finite metric) | |")
        else:
            taus = " ".join(_fmt(t, ".2f") for t in st["taus"])
            lines.append(f"| {w} | {_fmt(st['stable_from'])} of {st['last_step']} | {taus} |")
    lines += ["", "## Tuning budget", "",
              "Expected best eval metric of k trials drawn from an optimizer's "
              f"{N * S} (with replacement; Dodge et al. 2019's expected validation "
              "performance), with a 95% bootstrap interval over its trials; a trial that "
              "never reached a finite metric counts as the worst best of the workload's "
              f"trials. k = 1 is a single untuned trial, k = {N} one study's budget. The "
              f"curves against k are in {BUDGET_FILE}.", "",
              f"| workload | optimizer | k = 1 | k = {N} | k = {N * S} |", "|---|---|---|---|---|"]
    for w in wls:
        for o in opts:
            curve = s["tuning_budget"][w][o]
            if curve is None:
                lines.append(f"| {w} | {o} | - | - | - |")
                continue
            cells = [f"{_fmt(curve['expected'][k - 1])} [{_fmt(curve['low'][k - 1])}, "
                     f"{_fmt(curve['high'][k - 1])}]" for k in (1, N, N * S)]
            lines.append(f"| {w} | {o} | " + " | ".join(cells) + " |")
    lines += ["", "## Best hyperparameters", "",
              "The trial with the best final metric over all studies.", "",
              "| workload | optimizer | hyperparameters |", "|---|---|---|"]
    for w in wls:
        for o in opts:
            hp = ", ".join(f"{k}={_fmt(v)}" for k, v in s["best_hparams"][w][o].items())
            lines.append(f"| {w} | {o} | {hp} |")
    if results.get("speedup"):
        lines += _speedup_section(results["speedup"])
    lines += _timing_section(results, s)
    return "\n".join(lines) + "\n"


def _speedup_plan(speedup):
    """The scaling study's Plan of the speedup results `speedup` (as `run_benchmark` keeps
    them)."""
    return scaling_study.make_plan("speedup", speedup["preset"], speedup["workdir"],
                                   speedup["seeds"], speedup["optimizer"],
                                   speedup["optimizers"])


def _speedup_section(speedup):
    """The speedup study's report (`scaling_study.render_speedup`), one heading level down."""
    title, *lines = scaling_study.render_speedup(_speedup_plan(speedup), speedup)
    return ["", "#" + title, "", f"The scaling study's `speedup` study, run in {SPEEDUP_DIR}/ "
            f"(its runs.jsonl, and its own report.md with its wall clock); figure: "
            f"{SPEEDUP_FILE}."] + ["#" + line if line.startswith("#") else line
                                   for line in lines]


def _timing_section(results, s):
    opts, wls = results["optimizers"], list(results["workloads"])
    pairs = results["pairs"]
    lines = ["", TIMING_HEADING, "",
             f"Measured on {results['device']} in this run (read-back results keep their own "
             "timings). s/step: one trial's seconds per step (its program's time / its "
             "trials, compilation excluded); compile: seconds compiling the chunk programs.",
             "", "| workload | optimizer | programs | mode | s / step | compile s |",
             "|---|---|---|---|---|---|"]
    total_flops, total_seconds, counted = 0.0, 0.0, True
    for w in wls:
        for o in opts:
            p = pairs[w][o]
            mode = "vmap" if p["vectorized"] else "one by one"
            if not results["workloads"][w].get("batched_steps", True):
                mode += ", step by step"
            lines.append(f"| {w} | {o} | {p['programs']} | {mode} | "
                         f"{_fmt(p['seconds_per_step'], '.2e')} | {p['compile_seconds']:.1f} |")
            total_seconds += p["run_seconds"]
            flops = results["workloads"][w]["model_flops_per_step"]
            if flops is None and p["trials"]:
                counted = False
            elif p["trials"]:
                total_flops += flops * len(p["trials"]) * results["workloads"][w]["steps"]
    lines += ["", "Time to target in seconds (median over studies) and the scores on it:", "",
              "| workload | " + " | ".join(opts) + " |", "|---|" + "---|" * len(opts)]
    for w in wls:
        lines.append(f"| {w} | " + " | ".join(_fmt(s["seconds"]["times"][o][w], ".3g")
                                             for o in opts) + " |")
    lines += ["", "| optimizer | score (seconds) | 95% interval |", "|---|---|---|"]
    for o in sorted(opts, key=lambda o: -s["seconds"]["scores"][o]):
        iv = s["seconds"]["intervals"][o]
        lines.append(f"| {o} | {iv.score:.3f} | {iv.low:.3f} .. {iv.high:.3f} |")
    peak = results["matmul_flops_per_second"]
    if counted and total_seconds > 0:
        rate = total_flops / total_seconds
        lines += ["", f"Model FLOPs of the study (XLA's count of each trial's loss and "
                  f"gradient, optimizers excluded): {total_flops:.3g} in {total_seconds:.1f} s "
                  f"of training: {rate / 1e9:.3g} GFLOP/s, {rate / peak:.1%} of the "
                  f"{peak / 1e9:.3g} GFLOP/s of a float32 1024^2 matmul measured in this "
                  "process."]
    else:
        lines += ["", "Model FLOPs not counted (no cost model for some workload)."]
    return lines


def plot_profiles(results, path, summary=None):
    """The performance profiles rho(tau) on steps and on seconds, side by side."""
    s = summary or summarize(results)
    taus = np.linspace(1.0, R_MAX, 301)
    fig = Figure(figsize=(11, 4.2))
    for i, unit in enumerate(("steps", "seconds")):
        ax = fig.add_subplot(1, 2, i + 1)
        for o, rho in scoring.performance_profile(s[unit]["times"], taus).items():
            ax.step(taus, rho, where="post",
                    label=f"{o} (B = {s[unit]['scores'][o]:.2f})")
        ax.set_xlabel(f"tau (time to target in {unit} / the best's)")
        ax.set_ylabel("fraction of workloads within tau")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"performance profile ({unit})")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def plot_tuning_budget(results, path, summary=None):
    """Per workload the expected best metric against the number of trials, a line and its
    95% bootstrap band per optimizer."""
    s = summary or summarize(results)
    wls = list(results["workloads"])
    cols = min(3, len(wls))
    rows = math.ceil(len(wls) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    for i, w in enumerate(wls):
        ax = fig.add_subplot(rows, cols, i + 1)
        for o, curve in s["tuning_budget"][w].items():
            if curve is None:
                continue
            line, = ax.plot(curve["ks"], curve["expected"], marker=".", label=o)
            ax.fill_between(curve["ks"], curve["low"], curve["high"], alpha=0.15,
                            color=line.get_color())
        ax.axvline(results["trials"], color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("trials k")
        ax.set_ylabel(f"expected best {results['workloads'][w]['metric']}")
        ax.set_title(w, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def write_outputs(workdir, results):
    """DIR/results.json, DIR/report.md, DIR/performance_profile.png, DIR/tuning_budget.png
    and, with a speedup study, DIR/speedup_vs_size.png; returns the report."""
    os.makedirs(workdir, exist_ok=True)
    write_atomically(os.path.join(workdir, RESULTS_FILE), json.dumps(results, indent=1))
    text = render_report(results)
    write_atomically(os.path.join(workdir, REPORT_FILE), text)
    summary = summarize(results)
    plot_profiles(results, os.path.join(workdir, PROFILE_FILE), summary)
    plot_tuning_budget(results, os.path.join(workdir, BUDGET_FILE), summary)
    if results.get("speedup"):
        scaling_study.plot_speedup(_speedup_plan(results["speedup"]), results["speedup"],
                                   os.path.join(workdir, SPEEDUP_FILE))
    return text


# ------------------------------------------------------------------------------- the job

def _import_modules(flag, names):
    for name in names or ():
        try:
            user_modules.import_user_module(name)
        except Exception as error:  # noqa: BLE001 - whatever the user's module raised
            cli.fail(f"--{flag}={name}: {type(error).__name__}: {error}")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    _import_modules(user_modules.FLAG, flags.FLAGS[user_modules.FLAG].value)
    _import_modules("workload_module", _given(_WORKLOAD_MODULE))
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        with cli.usage_errors():
            plan = make_plan(_given(_WORKDIR), _given(_PRESET) or "smoke", _given(_SUITE),
                             _given(_OPTIMIZERS), _given(_TRIALS), _given(_STUDIES),
                             _given(_BASELINE))
            stack.enter_context(workdir_lib.lock(plan.workdir))
        for name, why in plan.skipped.items():
            print(f"bench: skipping {name}: {why}", flush=True)
        try:
            results = run_benchmark(plan)
        except cli.UsageError as error:   # a saved result with other settings
            cli.fail(error)
        text = write_outputs(plan.workdir, results)
    print(text)
    print(f"bench: {time.perf_counter() - began:.0f} s; report in "
          f"{os.path.join(plan.workdir, REPORT_FILE)}, profiles in "
          f"{os.path.join(plan.workdir, PROFILE_FILE)}"
          + (f", speedups in {os.path.join(plan.workdir, SPEEDUP_FILE)}" if plan.speedup
             else "") + f", numbers in {os.path.join(plan.workdir, RESULTS_FILE)}")


def run_script():
    """`ravine-bench` / `python -m ravine.experiments.bench`."""
    cli.run(main)


if __name__ == "__main__":
    run_script()
