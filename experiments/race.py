r"""Race optimizers on one workload: a learning-rate sweep each, compared at their best.

    python -m experiments.race --workdir=runs/race \
        --optimizers=adamw,lion,shampoo,soap,muon --lr_points=3

For every optimizer, trains the LM config (`--config`, default `lm.py:tiny`) once per
learning rate on a log grid (`--lr_points` points spaced by `--lr_spacing` around the
optimizer's entry in `CENTRE_LR`, or the explicit `--lrs`), picks the learning rate with the
lowest final eval loss, and reports for that run: final eval loss, steps and seconds to
reach the target eval loss (`--target`; default the best final eval loss of the first
optimizer listed, AdamW in the default race), seconds per step (median, compilation, eval
and checkpointing excluded) and optimizer-state memory. Seconds to target are
`steps to target x seconds per step`, so a slow first compile does not count against an
optimizer. Every run is a normal `experiments.train` run in `DIR/runs/<optimizer>_lr<lr>`
(its own metrics.jsonl, loss.png and checkpoint), so a race that is stopped resumes where
it was: finished runs are read back, not redone.

Writes DIR/report.md (the table, plus every run of the sweep) and DIR/curves.png (eval
loss of each optimizer's best run against step and against seconds). Any field of the
config can be set as in experiments.train, e.g. `--config.steps=1000`; the optimizer's
other hyperparameters keep their defaults. For Muon, `--muon_adam_lr` sets the peak
learning rate of its AdamW leaves (embeddings, head, gains), which otherwise would share
Muon's much larger one.
"""
import copy
import math
import os

import jax
import numpy as np
from absl import flags, logging

import optim
from experiments import cli, train

# A good learning rate for each optimizer on the tiny LM (warmup-cosine), the middle of the
# default grid. Muon's is for its orthogonalized matrices; its AdamW leaves use muon_adam_lr.
CENTRE_LR = {"sgd": 0.3, "adagrad": 0.03, "rmsprop": 1e-3, "adam": 3e-3, "adamw": 3e-3,
             "lion": 1e-3, "adafactor": 1e-2, "shampoo": 3e-3, "soap": 1e-2, "muon": 0.03}

# --config and --workdir as in experiments.train; the race's default workload is tiny. (The
# default is given when the flag is defined: ml_collections applies `--config.<field>`
# overrides then, so changing it later breaks them.)
_CONFIG, _WORKDIR, _ = train.define_flags(train.DEFAULT_CONFIG + ":tiny")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["adamw", "lion", "shampoo", "soap", "muon"],
                                "Optimizers to race (names from optim.available()).")
_LRS = flags.DEFINE_list("lrs", [], "Explicit learning rates for every optimizer "
                         "(default: a grid around each one's CENTRE_LR).")
_LR_POINTS = flags.DEFINE_integer("lr_points", 3, "Learning rates per optimizer.")
_LR_SPACING = flags.DEFINE_float("lr_spacing", math.sqrt(10), "Ratio of neighbouring lrs.")
_TARGET = flags.DEFINE_float("target", None, "Target eval loss for steps-to-target "
                             "(default: the first optimizer's best final eval loss).")
_MUON_ADAM_LR = flags.DEFINE_float("muon_adam_lr", 3e-3, "Peak lr of Muon's AdamW leaves.")
_EVALS = flags.DEFINE_integer("evals", 10, "Evaluations per run (sets config.eval_every).")

REPORT_FILE, CURVES_FILE = "report.md", "curves.png"


def lr_grid(name, points, spacing, explicit=()):
    """The learning rates to try for optimizer `name`: `explicit` if given, else `points`
    values spaced by `spacing` (log grid) centred on CENTRE_LR[name]."""
    if explicit:
        return sorted(explicit)
    centre = CENTRE_LR.get(name, 1e-3)
    return [centre * spacing ** (i - (points - 1) / 2) for i in range(points)]


def validate_flags(optimizers, lrs, points, spacing, target, evals, muon_adam_lr=3e-3):
    """ValueError naming the first bad flag value."""
    if not optimizers:
        raise ValueError("--optimizers is empty")
    for name in optimizers:
        if name not in optim.available():
            raise ValueError(f"unknown optimizer {name!r} in --optimizers; known: "
                             f"{', '.join(optim.available())}")
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
    if points < 1:
        raise ValueError(f"--lr_points must be >= 1, got {points}")
    if not spacing > 1:
        raise ValueError(f"--lr_spacing must be > 1, got {spacing}")
    if evals < 1:
        raise ValueError(f"--evals must be >= 1, got {evals}")
    if not muon_adam_lr > 0 or not math.isfinite(muon_adam_lr):
        raise ValueError(f"--muon_adam_lr must be a positive number, got {muon_adam_lr}")
    if target is not None and not math.isfinite(target):
        raise ValueError(f"--target must be a finite loss, got {target}")
    return parsed


def run_config(base, name, lr, muon_adam_lr, evals=10):
    """`base` with optimizer `name` at peak learning rate `lr` (other hparams at their
    defaults), evaluated `evals` times."""
    config = copy.deepcopy(base)
    config.eval_every = max(1, config.steps // evals)
    with config.unlocked():
        for key in config.optimizer:
            if key not in ("name", "no_decay", "muon_exclude"):
                config.optimizer[key] = None
        config.optimizer.name = name
        config.optimizer.learning_rate = lr
        if name == "muon":
            config.optimizer.adam_learning_rate = muon_adam_lr
    return config


def state_bytes(setup):
    """Bytes of the optimizer state (all devices' shards counted once)."""
    return sum(leaf.size * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(setup.abstract_state["opt_state"]))


def eval_curve(summary):
    """[(step, eval_loss)] of a run."""
    return [(row["step"], row["eval_loss"]) for row in summary["history"]
            if row.get("eval_loss") is not None]


def seconds_per_step(summary, tokens_per_step):
    """Median training seconds per step (from the logged tokens/s)."""
    rate = summary["tokens_per_sec"]
    return tokens_per_step / rate if rate else math.nan


def steps_to(curve, target):
    """First eval step whose loss is <= target, or None."""
    return next((step for step, loss in curve if loss <= target), None)


def finite_or_inf(value):
    return value if value is not None and math.isfinite(value) else math.inf


def sweep(base, name, lrs, workdir, muon_adam_lr, evals):
    """Trains `name` at every lr; returns the results, one dict per lr."""
    results = []
    for lr in lrs:
        config = run_config(base, name, lr, muon_adam_lr, evals)
        setup = train.setup(config)
        run_dir = os.path.join(workdir, "runs", f"{name}_lr{lr:.3g}")
        print(f"race: {name} lr={lr:.3g} -> {run_dir}", flush=True)
        summary = train.Run(setup, run_dir).train(progress=False)
        tokens = config.grad_accum * config.batch_size * config.seq_len
        results.append({"optimizer": name, "lr": lr, "workdir": run_dir,
                        "final_eval_loss": summary["final_eval_loss"],
                        "curve": eval_curve(summary),
                        "seconds_per_step": seconds_per_step(summary, tokens),
                        "state_bytes": state_bytes(setup), "params": setup.n_params})
        print(f"race: {name} lr={lr:.3g} final eval loss "
              f"{finite_or_inf(summary['final_eval_loss']):.4f}", flush=True)
    return results


def best_of(results):
    """The run with the lowest final eval loss; `at_edge` when its lr is the grid's lowest
    or highest (the optimum may lie outside the grid)."""
    best = min(results, key=lambda r: finite_or_inf(r["final_eval_loss"]))
    lrs = [r["lr"] for r in results]
    return dict(best, at_edge=len(lrs) > 1 and best["lr"] in (min(lrs), max(lrs)))


def _fmt(value, spec):
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def report(best, everything, target, target_source, config, eval_every):
    """The markdown report: the best run per optimizer, then the whole sweep."""
    lines = [
        "# Optimizer race", "",
        f"Workload: byte-level LM, {best[0]['params']:,} params, {config.steps} steps of "
        f"{config.grad_accum * config.batch_size} x {config.seq_len} tokens, schedule "
        f"{config.schedule.name}, {jax.device_count()} x {jax.devices()[0].device_kind}.",
        f"Target eval loss: {target:.4f} ({target_source}).", "",
        "| optimizer | best lr | final eval loss | steps to target | s / step "
        "| s to target | state MiB |",
        "|---|---|---|---|---|---|---|"]
    for r in sorted(best, key=lambda r: finite_or_inf(r["final_eval_loss"])):
        steps = steps_to(r["curve"], target)
        seconds = None if steps is None else steps * r["seconds_per_step"]
        lines.append(
            f"| {r['optimizer']} | {r['lr']:.3g}{'*' if r['at_edge'] else ''} "
            f"| {_fmt(r['final_eval_loss'], '.4f')} "
            f"| {'-' if steps is None else steps} | {_fmt(r['seconds_per_step'], '.4f')} "
            f"| {_fmt(seconds, '.1f')} | {r['state_bytes'] / 2**20:.2f} |")
    lines += ["", "Steps to target are counted at eval steps (every "
              f"{eval_every}); seconds to target = steps x median s / step; "
              "'-': not reached. *: the best lr is at the edge of the grid, so a better one "
              "may lie beyond it (widen the grid with --lr_points or --lrs).", "",
              "## Every run", "",
              "| optimizer | lr | final eval loss | workdir |", "|---|---|---|---|"]
    for r in everything:
        lines.append(f"| {r['optimizer']} | {r['lr']:.3g} | "
                     f"{_fmt(r['final_eval_loss'], '.4f')} | {r['workdir']} |")
    return "\n".join(lines) + "\n"


def plot_curves(best, target, path):
    """Eval loss of each optimizer's best run vs step and vs seconds, saved as a PNG."""
    import matplotlib  # here, not at the top: a bad flag should fail without loading it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in best:
        if not r["curve"]:
            continue
        steps, losses = np.array(r["curve"], dtype=float).T
        label = f"{r['optimizer']} (lr {r['lr']:.3g})"
        axes[0].plot(steps, losses, "o-", markersize=3, label=label)
        axes[1].plot(steps * r["seconds_per_step"], losses, "o-", markersize=3, label=label)
    for ax, xlabel in zip(axes, ("step", "seconds (training only)")):
        ax.axhline(target, color="gray", linestyle=":", label="target")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval loss (nats / byte)")
    axes[0].legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def race(base, optimizers, workdir, lrs=(), points=3, spacing=math.sqrt(10), target=None,
         muon_adam_lr=3e-3, evals=10):
    """Runs the race; returns (best run per optimizer, every run, target, its source)."""
    everything, best = [], []
    for name in optimizers:
        results = sweep(base, name, lr_grid(name, points, spacing, lrs), workdir, muon_adam_lr,
                        evals)
        everything += results
        best.append(best_of(results))
    source = "given"
    if target is None:
        target, source = best[0]["final_eval_loss"], f"best final eval loss of {optimizers[0]}"
    return best, everything, target, source


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    base = cli.flag_value(_CONFIG)
    workdir = _WORKDIR.value
    if not workdir:
        cli.fail("--workdir is required")
    with cli.usage_errors():
        lrs = validate_flags(_OPTIMIZERS.value, _LRS.value, _LR_POINTS.value,
                             _LR_SPACING.value, _TARGET.value, _EVALS.value,
                             _MUON_ADAM_LR.value)
        # Every run's config and optimizer is checked before the first run starts; the
        # corpus, mesh and model once.
        configs = [run_config(base, name, lr, _MUON_ADAM_LR.value, _EVALS.value)
                   for name in _OPTIMIZERS.value
                   for lr in lr_grid(name, _LR_POINTS.value, _LR_SPACING.value, lrs)]
        for config in configs:
            train.validate(config)
            train.build_optimizer(config, train.build_schedule(config))
        train.setup(configs[0])
    best, everything, target, source = race(
        base, _OPTIMIZERS.value, workdir, lrs, _LR_POINTS.value, _LR_SPACING.value,
        _TARGET.value, _MUON_ADAM_LR.value, _EVALS.value)
    text = report(best, everything, target, source, base, max(1, base.steps // _EVALS.value))
    with open(os.path.join(workdir, REPORT_FILE), "w") as f:
        f.write(text)
    plot_curves(best, target, os.path.join(workdir, CURVES_FILE))
    print(text)
    print(f"race: report in {os.path.join(workdir, REPORT_FILE)}, "
          f"curves in {os.path.join(workdir, CURVES_FILE)}")


if __name__ == "__main__":
    cli.run(main)
