"""Learning-rate sensitivity with and without QK-norm and z-loss (Wortsman et al. 2023, CPU scale).

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
instabilities", https://arxiv.org/abs/2309.14322) reproduce two instabilities of large
Transformers in small ones by raising the learning rate: attention logits that grow until
the softmax saturates (fixed by QK-layernorm) and output logits that drift (log Z far from
0; fixed by PaLM's z-loss, 1e-4 * log^2 Z). Their summary number is the LR sensitivity,
the mean over the lr range of `min(loss(lr), initial loss) - min_lr loss(lr)`: 0 for a
model that does equally well at every lr of the range, larger when it is sensitive.

Setup: the byte-level `models.Transformer` (--d_model, --n_layers, --n_heads), Adam with a
10% warmup then cosine to 0.1x, the same batches for every run, a log-spaced lr grid over
--min_lr..--max_lr; four variants: no fix, `qk_norm=True`, z-loss 1e-4 (`models.lm_loss`),
and both. Per run: the final validation loss (NaN = diverged: a non-finite training
loss), and the largest attention logit reached during training
(`models.CausalSelfAttention` records it). Printed: both tables and each variant's LR
sensitivity, with diverged runs counted at the initial loss. Wortsman et al. also use
weight decay independent of the lr; that is `weight_decay_mode="independent"` of the
optimizers and is not part of this demo (Adam without decay here).

Measured (2-core CPU, 2026-12-01, default flags; docs/demos/stability.txt): without
QK-norm the largest attention logit grows with the lr from 0.6 to 1e7, with it it stays
below 9 up to lr 0.03; QK-norm lowers the LR sensitivity a little (0.692 -> 0.659) and the
best loss (2.716 -> 2.680); z-loss changes nothing at this scale.

  python -m ravine.experiments.demos.stability
"""
import numpy as np
from absl import flags

from ravine import models
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common, _lr_sweep

# name -> (qk_norm, z-loss coefficient)
VARIANTS = {"none": (False, 0.0), "qk_norm": (True, 0.0), "z_loss": (False, 1e-4),
            "both": (True, 1e-4)}


def lr_sensitivity(losses, initial_loss):
    """Wortsman et al.'s metric: mean over lrs of min(loss, initial) minus the best loss.

    Diverged runs (NaN) count as the initial loss.
    """
    losses = np.asarray(losses, np.float64)
    capped = np.where(np.isfinite(losses), np.minimum(losses, initial_loss), initial_loss)
    return float(capped.mean() - capped.min())


def run(variants=tuple(VARIANTS), min_lr=1e-4, max_lr=1.0, n_lrs=9, steps=100, batch_size=8,
        seq_len=32, d_model=128, n_layers=2, n_heads=4, z_loss=1e-4, eval_batches=16,
        corpus_path="", seed=0):
    """Sweeps each variant over the lr grid; returns losses, max logits and sensitivities."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants must be among {list(VARIANTS)}, got {sorted(unknown)}")
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    batches, held_out = _lr_sweep.make_batches(corpus_path, steps, batch_size, seq_len,
                                               eval_batches, seed)
    lrs = np.geomspace(min_lr, max_lr, n_lrs)
    result = {"lrs": lrs, "steps": steps, "variants": list(variants), "loss": {},
              "max_logit": {}, "sensitivity": {}}
    for name in variants:
        qk_norm, coefficient = VARIANTS[name]
        config = models.TransformerConfig(vocab_size=256, d_model=d_model, n_layers=n_layers,
                                          n_heads=n_heads, max_len=seq_len, qk_norm=qk_norm)
        curves = _lr_sweep.sweep(config, lrs, batches, held_out,
                                 z_loss=z_loss if coefficient else 0.0, seed=seed)
        result["initial_loss"] = float(np.nanmean(curves["loss"][:, 0]))
        diverged = ~np.isfinite(curves["loss"]).all(axis=1)
        result["loss"][name] = np.where(diverged, np.nan, curves["eval_loss"])
        result["max_logit"][name] = np.nanmax(np.where(np.isfinite(curves["max_logit"]),
                                                       curves["max_logit"], np.nan), axis=1)
    for name in variants:
        result["sensitivity"][name] = lr_sensitivity(result["loss"][name],
                                                     result["initial_loss"])
    return result


def _cells(row, fmt):
    return "".join(f"{x:>9{fmt}}" if np.isfinite(x) else f"{'nan':>9}" for x in row)


def report(result):
    header = "".join(f"{lr:>9.2g}" for lr in result["lrs"])
    lines = [f"validation loss after {result['steps']} steps (nan = diverged); initial loss "
             f"{result['initial_loss']:.3f}", f"  {'variant':<9}{header}"]
    lines += [f"  {name:<9}{_cells(result['loss'][name], '.3f')}" for name in result["variants"]]
    lines += ["largest attention logit during training", f"  {'variant':<9}{header}"]
    lines += [f"  {name:<9}{_cells(result['max_logit'][name], '.3g')}"
              for name in result["variants"]]
    lines.append("LR sensitivity (mean over lrs of min(loss, initial) - best loss):")
    lines += [f"  {name:<9}{result['sensitivity'][name]:.3f}  (best loss "
              f"{np.nanmin(result['loss'][name]):.3f})" for name in result["variants"]]
    return "\n".join(lines)


def plot(result, outdir, dpi=100):
    fig, (ax_loss, ax_logit) = _common.plt.subplots(1, 2, figsize=(11, 4.2))
    ceiling = result["initial_loss"]
    for name in result["variants"]:
        row = result["loss"][name]
        shown = np.where(np.isfinite(row), np.minimum(row, ceiling), ceiling)
        ax_loss.semilogx(result["lrs"], shown, "o-",
                         label=f"{name} (LR sensitivity {result['sensitivity'][name]:.2f})")
        ax_logit.loglog(result["lrs"], result["max_logit"][name], "o-", label=name)
    ax_loss.set(xlabel="peak learning rate (Adam)",
                ylabel="validation loss (diverged: initial loss)",
                title="Final loss vs learning rate")
    ax_logit.set(xlabel="peak learning rate (Adam)", ylabel="largest attention logit",
                 title="Attention logit growth")
    for ax in (ax_loss, ax_logit):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _common.save_figure(fig, outdir, "stability", dpi)


def main(argv):
    del argv
    with cli.usage_errors():
        result = run(FLAGS.variants, FLAGS.min_lr, FLAGS.max_lr, FLAGS.n_lrs, FLAGS.steps,
                     FLAGS.batch_size, FLAGS.seq_len, FLAGS.d_model, FLAGS.n_layers,
                     FLAGS.n_heads, FLAGS.z_loss, FLAGS.eval_batches, FLAGS.corpus, FLAGS.seed)
    print(report(result))
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    flags.DEFINE_list("variants", list(VARIANTS), f"Runs, from {list(VARIANTS)}.")
    flags.register_validator("variants", lambda v: bool(v) and set(v) <= set(VARIANTS),
                             message=f"--variants must name runs from {list(VARIANTS)}")
    flags.DEFINE_float("min_lr", 1e-4, "Smallest peak learning rate.", lower_bound=0.0)
    flags.DEFINE_float("max_lr", 1.0, "Largest peak learning rate.", lower_bound=0.0)
    flags.DEFINE_integer("n_lrs", 9, "Log-spaced learning rates.", lower_bound=2)
    flags.DEFINE_integer("steps", 100, "Training steps per run.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 8, "Sequences per batch.", lower_bound=1)
    flags.DEFINE_integer("seq_len", 32, "Bytes per sequence.", lower_bound=2)
    flags.DEFINE_integer("d_model", 128, "Model width.", lower_bound=2)
    flags.DEFINE_integer("n_layers", 2, "Transformer blocks.", lower_bound=1)
    flags.DEFINE_integer("n_heads", 4, "Attention heads.", lower_bound=1)
    flags.DEFINE_float("z_loss", 1e-4, "z-loss coefficient of the z-loss variants.",
                       lower_bound=0.0)
    flags.DEFINE_integer("eval_batches", 16, "Validation batches for the final loss.",
                         lower_bound=1)
    flags.DEFINE_string("corpus", "", "Text file or folder; empty = the Python stdlib source.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
