"""Why warmup? The largest stable peak lr and the sharpness, with and without warmup.

Kalra & Barkeshli 2024 ("Why Warmup the Learning Rate? Underlying Mechanisms and
Improvements", https://arxiv.org/abs/2406.09405) read warmup as sharpness reduction: a
network whose sharpness (top Hessian eigenvalue) at init is too large for the target lr
is unstable if that lr is applied at once (the loss spikes, a "catapult", and training may
never recover); a warmup raises the lr slowly enough that the sharpness comes down ahead
of it, staying near or below the stability threshold 2/eta_t, so the run reaches a larger
peak lr without a spike. The seed (004, "Why warmup?") makes the same point from the edge
of stability.

Setup: the byte-level `models.Transformer` of the stability demo (--d_model, --n_layers,
--n_heads), Adam with peak lr eta and cosine decay to 0.1 eta over --steps, either from
step 0 ("no warmup") or after a linear warmup over --warmup_fraction of the steps; the same
init and batches for every run (`_lr_sweep.sweep`: all runs of a part in one compiled
program).

1. Stable lrs: a half-octave grid of peak lrs (--min_log2_lr..--max_log2_lr), each with
   and without warmup. A run is stable if its training loss stays finite and never rises
   above the untrained model's loss on the same batch (a run at lr 0 in the same program):
   the model at init predicts nearly uniform bytes, so a loss above it is a spike that
   undid all progress (Adam's bounded steps rarely make the loss non-finite). The largest
   stable lr is the largest grid lr below which every run is stable; printed: both, and
   their ratio.
2. Sharpness: at --sharpness_lrs (default: the two largest stable lrs of part 1, so at the
   larger one only the warmed-up run is stable), with and without warmup, the top Hessian
   eigenvalue of the training objective on one held-out batch every --sharpness_every
   steps over the first --sharpness_steps steps (`optim.diagnostics.hessian_spectrum`:
   Lanczos, which finds the top eigenvalue where power iteration's `sharpness` would lock
   onto the large negative ones of the early transformer), against 2/eta_t. Printed per
   run, over the measured steps after step 0: the sharpness at init, its peak, its median,
   its median over the second half of the window (after the warmup, at the defaults), and
   the fraction of those steps with sharpness below 2/eta_t.

2/eta_t is gradient descent's threshold. Adam's own (Cohen et al. 2022) is on the
preconditioned sharpness, lambda_max(P^-1 H) < 38/eta_t for beta1 = 0.9, which this demo
does not measure: on the tiny LM, bytes that are rare in the batches keep second moments
near 0, and with eps = 1e-8 they made lambda_max(P^-1 H) jump between 1e2 and 1e11 from one
measured step to the next in a prototype, which says more about eps than about warmup.

Measured (2-core CPU, default flags, about 3 minutes; docs/demos/warmup.json): the largest
stable peak lr is 0.044 without warmup and 0.25 with a 20-step warmup, 5.7x larger (above
0.044 the run without warmup spikes, by 0.06 nats at 0.0625 and 5.3 at 0.25; the warmed-up
run first spikes at 0.35). At lr 0.25 the run without warmup catapults: sharpness 36 at
init, 1.4e4 at its peak, loss 10.9, then a median sharpness of 26 over steps 20..40, far
above 2/eta = 8 (0% of measured steps below 2/eta_t); with warmup the sharpness never
exceeds 56, falls to a median of 4.3 over steps 20..40 and is below 2/eta_t at 90% of
the measured steps: sharpness reduction, as Kalra & Barkeshli read warmup. At lr 0.044,
where both runs are stable, warmup still ends flatter (median over steps 20..40 4.5 vs
8.0). The final losses barely depend on warmup where both are stable (best validation
loss 2.638 with, 2.659 without): at this scale warmup buys a 5.7x wider stable lr range,
not a better model.

  python -m ravine.experiments.demos.warmup --outdir=docs/demos --dpi=80
"""
import time

import jax
import numpy as np
from absl import flags

from ravine import models
from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common, _lr_sweep
from ravine.optim import diagnostics


def config_of(d_model=64, n_layers=2, n_heads=4, seq_len=32):
    """The tiny byte LM (standard parametrization)."""
    return models.TransformerConfig(vocab_size=256, d_model=d_model, n_layers=n_layers,
                                    n_heads=n_heads, max_len=seq_len)


def largest_stable(lrs, stable):
    """The largest lr below which (itself included) every run is stable; None if the
    smallest is not."""
    unstable = np.flatnonzero(~np.asarray(stable, bool))
    last = unstable[0] - 1 if unstable.size else len(lrs) - 1
    return float(lrs[last]) if last >= 0 else None


def step_sizes(lr, warmup_fraction, steps):
    """eta_t, t = 0..steps-1: the schedule `_lr_sweep.sweep` trains with."""
    shape = optim.schedules.warmup_cosine(1.0, steps, int(warmup_fraction * steps))
    return lr * np.asarray(shape(np.arange(steps)), np.float64)


SETTINGS = ("no warmup", "warmup")


def train(config, lrs, warmup_fraction, batches, eval_batches=None, hessian_batch=None,
          probe_steps=(), num_lanczos=20, seed=0):
    """Every lr of `lrs` without and with warmup, all in one compiled program; with
    `probe_steps`, the top Hessian eigenvalue of the training objective on `hessian_batch`
    before each of those steps.

    Returns {"no warmup" | "warmup": dict of numpy arrays, one row per lr}: "loss" [steps]
    (training cross-entropy), "eval_loss" (with `eval_batches`), and with `probe_steps`
    "eta" and "sharpness" [len(probe_steps)] (eta_t: the lr of the step taken from there);
    and "untrained": the init's loss on each training batch [steps] (a run at lr 0).
    """
    def probe(loss_fn, params, opt_state, hessian_batch):
        del opt_state
        # Lanczos' largest Ritz value is the top (algebraic) eigenvalue; power iteration
        # (`diagnostics.sharpness`) would return the largest in magnitude, which early in
        # training is often a negative one.
        spectrum = diagnostics.hessian_spectrum(loss_fn, params, hessian_batch, k=1,
                                                num_lanczos=num_lanczos, num_probes=1,
                                                grid_size=2, key=_common.prng_key(seed + 1))
        return spectrum.top_eigenvalues[0]

    fractions = {"no warmup": 0.0, "warmup": warmup_fraction}
    lrs, n = np.asarray(lrs, np.float64), len(lrs)
    # Run 0 has lr 0: the untrained model's loss on every batch, the baseline a spike is
    # measured from (batches differ by a few hundredths of a nat at init, so comparing with
    # step 0's loss alone would call noise a spike).
    curves = _lr_sweep.sweep(config, np.concatenate([[0.0], lrs, lrs]), batches, eval_batches,
                             warmup_fraction=np.repeat([0.0] + [fractions[s] for s in SETTINGS],
                                                       [1, n, n]),
                             seed=seed, probe=probe if len(probe_steps) else None,
                             probe_steps=probe_steps, probe_batch=hessian_batch)
    out = {"untrained": curves["loss"][0]}
    for i, setting in enumerate(SETTINGS):
        rows = slice(1 + i * n, 1 + (i + 1) * n)
        out[setting] = {"lrs": lrs, "warmup_fraction": fractions[setting],
                        "loss": curves["loss"][rows]}
        if eval_batches is not None:
            out[setting]["eval_loss"] = curves["eval_loss"][rows]
        if len(probe_steps):
            out[setting]["sharpness"] = curves["probe"][rows].astype(np.float64)
            shape = step_sizes(1.0, fractions[setting], batches.shape[0])[list(probe_steps)]
            out[setting]["eta"] = lrs[:, None] * shape
    return out


def stability(trained):
    """Per setting: the largest rise of the training loss above the untrained model's loss
    on the same batch (inf if not finite), whether the run is stable (rise <= 0) and the
    largest stable lr."""
    out = {}
    for setting in SETTINGS:
        loss = trained[setting]["loss"]
        finite = np.isfinite(loss).all(axis=1)
        excess = np.where(finite, np.nanmax(loss - trained["untrained"], axis=1), np.inf)
        stable = finite & (excess <= 0)
        out[setting] = {"max_loss_excess": excess, "stable": stable,
                        "largest_stable_lr": largest_stable(trained[setting]["lrs"], stable)}
    return out


def sharpness_summary(trained, probe_steps, window):
    """Per setting and lr: the sharpness at step 0, its peak and median over the measured
    steps in 1..window, its median over those in window/2..window, and the fraction of
    them at which it is below 2/eta_t."""
    probe_steps = np.asarray(probe_steps)
    inside = (probe_steps >= 1) & (probe_steps <= window)
    late = inside & (probe_steps >= window / 2)
    out = {}
    for setting in SETTINGS:
        sharpness, eta = trained[setting]["sharpness"], trained[setting]["eta"]
        threshold = 2.0 / np.where(eta > 0, eta, np.nan)  # eta = 0: no threshold (NaN)
        below = np.where(np.isnan(threshold), True, sharpness < threshold)
        out[setting] = {"initial": sharpness[:, 0], "peak": sharpness[:, inside].max(axis=1),
                        "median": np.median(sharpness[:, inside], axis=1),
                        "late_median": np.median(sharpness[:, late], axis=1),
                        "below_threshold": below[:, inside].mean(axis=1)}
    return out


def run(min_log2_lr=-8.0, max_log2_lr=0.0, warmup_fraction=0.2, steps=100, batch_size=8,
        seq_len=32, d_model=64, n_layers=2, n_heads=4, eval_batches=8, sharpness_lrs=None,
        sharpness_steps=None, sharpness_every=2, num_lanczos=20, corpus_path="", seed=0):
    """Part 1 on the grid, then part 2 at `sharpness_lrs` (None: the largest stable lr
    without and with warmup) over steps 0..`sharpness_steps` (None: twice the warmup)."""
    if not min_log2_lr < max_log2_lr:
        raise ValueError(f"need min_log2_lr < max_log2_lr, got {min_log2_lr}, {max_log2_lr}")
    warmup_steps = int(warmup_fraction * steps)
    if not 0 < warmup_steps < steps:
        raise ValueError(f"warmup_fraction * steps must round down to a step count in "
                         f"(0, steps), got {warmup_fraction} * {steps}")
    window = min(2 * warmup_steps if sharpness_steps is None else sharpness_steps, steps - 1)
    if sharpness_every > window:
        raise ValueError(f"sharpness_every ({sharpness_every}) leaves no measurement in steps "
                         f"1..{window}")
    lrs = 2.0 ** np.arange(min_log2_lr, max_log2_lr + 0.25, 0.5)
    batches, held_out = _lr_sweep.make_batches(corpus_path, steps, batch_size, seq_len,
                                               eval_batches, seed)
    config = config_of(d_model, n_layers, n_heads, seq_len)
    grid = train(config, lrs, warmup_fraction, batches, held_out, seed=seed)
    stable = stability(grid)
    if sharpness_lrs is None:
        sharpness_lrs = sorted({stable[s]["largest_stable_lr"] for s in SETTINGS} - {None})
    probe_steps = list(range(0, window + 1, sharpness_every))
    trained = train(config, sharpness_lrs, warmup_fraction, batches, hessian_batch=held_out[0],
                    probe_steps=probe_steps, num_lanczos=num_lanczos,
                    seed=seed) if sharpness_lrs else None
    largest = [stable[s]["largest_stable_lr"] for s in SETTINGS]
    return {"lrs": lrs, "steps": steps, "warmup_steps": warmup_steps,
            "initial_loss": float(grid["warmup"]["loss"][0, 0]), "grid": grid,
            "stability": stable, "largest_stable_lr": dict(zip(SETTINGS, largest)),
            "ratio": largest[1] / largest[0] if None not in largest else None,
            "sharpness_lrs": list(sharpness_lrs), "probe_steps": probe_steps, "window": window,
            "trained": trained,
            "sharpness": sharpness_summary(trained, probe_steps, window) if trained else None}


def report(result):
    """The printed lines: the stability table, the ratio, the sharpness summaries."""
    grid, stable, lrs = result["grid"], result["stability"], result["lrs"]
    lines = [f"largest rise of the training loss above the untrained model's on the same "
             f"batch (initial loss {result['initial_loss']:.3f}) over {result['steps']} steps "
             f"(stable: <= 0), and the final validation loss, per peak lr",
             f"  {'peak lr':>9}{'no warmup':>12}{'val':>7}{'warmup':>12}{'val':>7}"]
    for i, lr in enumerate(lrs):
        cells = "".join(f"{stable[s]['max_loss_excess'][i]:>+12.3f}"
                        f"{grid[s]['eval_loss'][i]:>7.3f}" for s in SETTINGS)
        lines.append(f"  {lr:>9.4g}{cells}")
    largest = result["largest_stable_lr"]
    ratio = "n/a" if result["ratio"] is None else f"{result['ratio']:.3g}x"
    lines.append(f"largest stable peak lr: no warmup {largest['no warmup']:.4g}, "
                 f"{result['warmup_steps']}-step warmup {largest['warmup']:.4g}: ratio {ratio}"
                 if result["ratio"] is not None else
                 f"largest stable peak lr: no warmup {largest['no warmup']}, warmup "
                 f"{largest['warmup']} (the grid's smallest lr was unstable)")
    if result["sharpness"] is None:
        return lines
    window = result["window"]
    lines.append(f"sharpness (top Hessian eigenvalue on one held-out batch) measured every "
                 f"{result['probe_steps'][1] - result['probe_steps'][0]} steps over steps "
                 f"1..{window} (warmup: steps 0..{result['warmup_steps']}):")
    lines.append(f"  {'lr':<12}{'setting':<11}{'at init':>8}{'peak':>10}{'median':>8}"
                 f"{'median ' + str(window // 2) + '..' + str(window):>14}"
                 f"{'below 2/eta_t':>15}{'max loss':>10}")
    for setting in SETTINGS:
        summary, trained = result["sharpness"][setting], result["trained"][setting]
        for i, lr in enumerate(result["sharpness_lrs"]):
            lines.append(f"  {lr:<12.4g}{setting:<11}{summary['initial'][i]:8.3g}"
                         f"{summary['peak'][i]:10.3g}{summary['median'][i]:8.3g}"
                         f"{summary['late_median'][i]:14.3g}"
                         f"{summary['below_threshold'][i]:15.0%}"
                         f"{np.max(trained['loss'][i]):10.3f}")
    return lines


def plot(result, outdir, dpi=100):
    """The stability criterion per lr; the sharpness against 2/eta_t and the training loss
    of the sharpness runs (color: lr; solid: warmup, dashed: none)."""
    fig, (ax_grid, ax_sharp, ax_loss) = _common.plt.subplots(1, 3, figsize=(16, 4.3))
    lrs = result["lrs"]
    for setting, color in zip(SETTINGS, ("C3", "C0")):
        excess = result["stability"][setting]["max_loss_excess"]
        ax_grid.semilogx(lrs, np.clip(excess, -6, 6), "o-", base=2, color=color, label=setting)
        if result["largest_stable_lr"][setting] is not None:
            ax_grid.axvline(result["largest_stable_lr"][setting], color=color, ls=":")
    ax_grid.axhline(0, color="k", lw=0.8)
    ratio = "" if result["ratio"] is None else f"; ratio {result['ratio']:.3g}"
    ax_grid.set(xlabel="peak learning rate (Adam)",
                ylabel="max rise above the untrained loss (clipped)",
                title=f"Stable lrs (dotted: the largest){ratio}")
    steps, window = result["probe_steps"], result["window"]
    for setting, style in zip(SETTINGS, ("--", "-")):
        trained = result["trained"][setting] if result["trained"] else None
        for i, lr in enumerate(result["sharpness_lrs"]):
            color, label = f"C{i}", f"lr {lr:.3g}, {setting}"
            ax_sharp.semilogy(steps, np.maximum(trained["sharpness"][i], 1e-2), style,
                              color=color, label=label)
            eta = trained["eta"][i]
            ax_sharp.semilogy(steps, 2 / np.where(eta > 0, eta, np.nan), ":", color=color,
                              lw=1)
            ax_loss.plot(np.arange(window + 1), trained["loss"][i, :window + 1], style,
                         color=color, label=label)
    ax_sharp.axvline(result["warmup_steps"], color="gray", lw=0.8)
    ax_sharp.set(xlabel="step", ylabel="top Hessian eigenvalue",
                 title="Sharpness (dotted: 2/eta_t; grey: end of warmup)")
    if result["trained"]:
        ax_loss.plot(np.arange(window + 1), result["trained"]["untrained"][:window + 1], "k",
                     lw=0.8, label="untrained model")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Loss over the same steps")
    for ax in (ax_grid, ax_sharp, ax_loss):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _common.save_figure(fig, outdir, "warmup", dpi)


def record(result):
    """The JSON-able numbers: the grid's criterion and final losses, the largest stable lrs
    and their ratio, the sharpness trajectories and their summaries."""
    def listed(tree):
        return jax.tree.map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v, tree)

    out = {"lrs": result["lrs"].tolist(), "steps": result["steps"],
           "warmup_steps": result["warmup_steps"], "initial_loss": result["initial_loss"],
           "largest_stable_lr": result["largest_stable_lr"], "ratio": result["ratio"],
           "stability": listed(result["stability"]),
           "eval_loss": {s: result["grid"][s]["eval_loss"].tolist() for s in SETTINGS},
           "sharpness_lrs": result["sharpness_lrs"], "probe_steps": result["probe_steps"],
           "window": result["window"]}
    if result["trained"]:
        out["sharpness"] = listed(result["sharpness"])
        out["trajectories"] = {s: {k: result["trained"][s][k].tolist()
                                   for k in ("eta", "sharpness")} for s in SETTINGS}
    return out


def define_flags(flag_values=flags.FLAGS):
    """The demo's flags, on `flag_values` (a fresh `flags.FlagValues()` in tests)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_float("min_log2_lr", -8.0, "Smallest peak lr of the grid, log2.", **fv)
    flags.DEFINE_float("max_log2_lr", 0.0, "Largest peak lr of the grid, log2 (half-octave "
                       "steps).", **fv)
    flags.DEFINE_float("warmup_fraction", 0.2, "Linear warmup over this fraction of the steps.",
                       lower_bound=0.0, upper_bound=1.0, **fv)
    flags.DEFINE_integer("steps", 100, "Training steps per run.", lower_bound=2, **fv)
    flags.DEFINE_integer("batch_size", 8, "Sequences per batch.", lower_bound=1, **fv)
    flags.DEFINE_integer("seq_len", 32, "Bytes per sequence.", lower_bound=2, **fv)
    flags.DEFINE_integer("d_model", 64, "Model width.", lower_bound=2, **fv)
    flags.DEFINE_integer("n_layers", 2, "Transformer blocks.", lower_bound=1, **fv)
    flags.DEFINE_integer("n_heads", 4, "Attention heads.", lower_bound=1, **fv)
    flags.DEFINE_integer("eval_batches", 8, "Validation batches for the final loss (the "
                         "first is also the sharpness batch).", lower_bound=1, **fv)
    flags.DEFINE_list("sharpness_lrs", [], "Peak lrs of the sharpness runs; empty: the "
                      "largest stable lr without and with warmup.", **fv)
    flags.register_validator(
        "sharpness_lrs", lambda v: all(_positive_number(x) for x in v),
        message="--sharpness_lrs must be a comma-separated list of positive numbers", **fv)
    flags.DEFINE_integer("sharpness_steps", None, "Measure the sharpness over steps "
                         "0..this (default: twice the warmup).", lower_bound=1, **fv)
    flags.DEFINE_integer("sharpness_every", 2, "Steps between sharpness measurements.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("num_lanczos", 20, "Lanczos steps per sharpness measurement.",
                         lower_bound=2, **fv)
    flags.DEFINE_string("corpus", "", "Text file or folder; empty = the Python stdlib source.",
                        **fv)
    flags.DEFINE_integer("seed", 0, "Random seed (init and batches).", **fv)
    _common.define_output_flags(flag_values)


def _positive_number(text):
    try:
        return float(text) > 0
    except ValueError:
        return False


def demo(flag_values):
    """Runs the demo with parsed `flag_values`: prints, saves the PNG and JSON; returns the
    result."""
    f = flag_values
    start = time.perf_counter()
    with cli.usage_errors():
        result = run(f.min_log2_lr, f.max_log2_lr, f.warmup_fraction, f.steps, f.batch_size,
                     f.seq_len, f.d_model, f.n_layers, f.n_heads, f.eval_batches,
                     [float(x) for x in f.sharpness_lrs] or None, f.sharpness_steps,
                     f.sharpness_every, f.num_lanczos, f.corpus, f.seed)
    for line in report(result):
        print(line)
    print("saved", plot(result, f.outdir, f.dpi))
    print("saved", _common.write_results("warmup", record(result), f.outdir))
    print(f"total {time.perf_counter() - start:.0f} s")
    return result


def main(argv):
    del argv
    demo(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
