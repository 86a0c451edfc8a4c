"""Learning-rate transfer across width: SP vs μP (the Tensor Programs V figure, CPU scale).

Yang et al. 2022 ("Tensor Programs V", https://arxiv.org/abs/2203.03466): in the standard
parametrization (SP) the best learning rate of Adam shrinks as the model widens, so a
learning rate tuned on a narrow proxy does not hold for the wide model; under μP (hidden
matrices' init variance ∝ 1/fan_in and lr ∝ 1/width, readout multiplied by
base_width/width, attention logits by 1/d_head) the optimum stays put, and wider is better
at every learning rate.

Setup: the byte-level `models.Transformer` (GELU MLP with d_ff = 4 * d_model, --n_layers
blocks, --n_heads heads at every width so d_head grows with width), SP = GPT-2's init
(std 0.02 everywhere) and one lr for all params; μP = `parametrization="mup"` with
base_width = the narrowest width (there SP and μP are the same model) and
`models.mup_lr_multipliers` applied by `optim.scale_by_multipliers`. Adam, warmup 10% then
cosine to 0.1x, the same --steps batches for every run; all learning rates of one model
train in one compiled program. Reported loss: the final params' validation loss on
--eval_batches held-out batches (NaN = diverged: a non-finite training loss). Printed:
the loss table, the best lr per width, and the shift of the optimum from the narrowest to
the widest width in grid steps.

Measured (2-core CPU, 2026-12-01, default flags; docs/demos/lr_transfer.txt): the optimum
moves -2 grid steps under SP and +1 under μP, but at 100 steps μP's wider models are not
better than its narrow one, while SP's widest reaches the lowest loss of all.

  python -m ravine.experiments.demos.lr_transfer
"""
import numpy as np
from absl import flags

from ravine import models
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common, _lr_sweep

PARAMETRIZATIONS = ("sp", "mup")
DEFAULT_WIDTHS = ["32", "64", "128", "256"]
DEFAULT_LOG2_LRS = [str(k) for k in range(-11, -3)]  # 2^-11 .. 2^-4


def run(widths=(32, 64, 128, 256), log2_lrs=tuple(range(-11, -3)), steps=100, batch_size=8,
        seq_len=32, n_layers=2, n_heads=4, eval_batches=16, corpus_path="", seed=0):
    """Sweeps every (parametrization, width); returns losses, best lrs and shifts.

    Returns a dict: "widths", "log2_lrs", "initial_loss", and per parametrization
    `final[p]` [widths, lrs] (NaN = diverged), `best[p]` (index of the best lr per width)
    and `shift[p]` (best index at the widest minus at the narrowest width).
    """
    widths, log2_lrs = sorted(widths), sorted(log2_lrs)
    if len(widths) < 2 or len(log2_lrs) < 2:
        raise ValueError(f"need >= 2 widths and >= 2 learning rates, got widths={widths}, "
                         f"log2_lrs={log2_lrs}")
    for width in widths:
        if width % n_heads or (width // n_heads) % 2:
            raise ValueError(f"width {width} must be a multiple of 2 * n_heads = {2 * n_heads}")
    batches, held_out = _lr_sweep.make_batches(corpus_path, steps, batch_size, seq_len,
                                               eval_batches, seed)
    lrs = [2.0**k for k in log2_lrs]
    result = {"widths": widths, "log2_lrs": log2_lrs, "final": {}, "best": {}, "shift": {},
              "steps": steps}
    for parametrization in PARAMETRIZATIONS:
        rows = []
        for width in widths:
            config = models.TransformerConfig(
                vocab_size=256, d_model=width, n_layers=n_layers, n_heads=n_heads,
                d_ff=4 * width, mlp="gelu", max_len=seq_len, parametrization=parametrization,
                base_width=widths[0])
            curves = _lr_sweep.sweep(config, lrs, batches, held_out, seed=seed)
            result["initial_loss"] = float(np.nanmean(curves["loss"][:, 0]))
            diverged = ~np.isfinite(curves["loss"]).all(axis=1)
            rows.append(np.where(diverged, np.nan, curves["eval_loss"]))
        final = np.asarray(rows)
        best = [best_index(row) for row in final]
        result["final"][parametrization] = final
        result["best"][parametrization] = best
        result["shift"][parametrization] = best[-1] - best[0]
    return result


def best_index(losses):
    """Index of the lowest loss, diverged (NaN) runs excluded."""
    losses = np.asarray(losses, np.float64)
    if not np.isfinite(losses).any():
        raise ValueError("every learning rate diverged; lower the grid")
    return int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan)))


def report(result):
    """The printed table: one row per (parametrization, width), then the shifts."""
    log2_lrs = result["log2_lrs"]
    header = "".join(f"{'2^' + str(k):>8}" for k in log2_lrs)
    lines = [f"validation loss after {result['steps']} steps (nan = diverged); "
             f"initial loss {result['initial_loss']:.3f}",
             f"  {'param':<6}{'width':>6}{header}{'best lr':>9}"]
    for parametrization in PARAMETRIZATIONS:
        for width, row, best in zip(result["widths"], result["final"][parametrization],
                                    result["best"][parametrization]):
            cells = "".join(f"{x:>8.3f}" if np.isfinite(x) else f"{'nan':>8}" for x in row)
            lines.append(f"  {parametrization:<6}{width:>6}{cells}{'2^' + str(log2_lrs[best]):>9}")
    for parametrization in PARAMETRIZATIONS:
        lines.append(f"{parametrization} optimum shift from width {result['widths'][0]} to "
                     f"{result['widths'][-1]}: {result['shift'][parametrization]:+d} grid steps")
    return "\n".join(lines)


def parse_report(text):
    """{(parametrization, width): (losses, best log2 lr)} from `report`'s rows (for tests)."""
    rows = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in PARAMETRIZATIONS and fields[1].isdigit():
            losses = [float(x) for x in fields[2:-1]]
            rows[(fields[0], int(fields[1]))] = (losses, int(fields[-1].removeprefix("2^")))
    return rows


def plot(result, outdir, dpi=100):
    fig, axes = _common.plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    lrs = 2.0 ** np.asarray(result["log2_lrs"], float)
    colors = _common.plt.cm.viridis(np.linspace(0, 0.9, len(result["widths"])))
    ceiling = result["initial_loss"]
    for ax, parametrization in zip(axes, PARAMETRIZATIONS):
        for width, row, best, color in zip(result["widths"], result["final"][parametrization],
                                           result["best"][parametrization], colors):
            shown = np.where(np.isfinite(row), np.minimum(row, ceiling), ceiling)
            ax.semilogx(lrs, shown, "o-", base=2, color=color, label=f"width {width}")
            ax.plot(lrs[best], row[best], "*", color=color, ms=14, mec="k")
        name = {"sp": "SP", "mup": "μP"}[parametrization]
        ax.set(xlabel="peak learning rate (Adam)",
               title=f"{name}: optimum moves {result['shift'][parametrization]:+d} grid steps")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("validation loss (diverged: shown at the initial loss)")
    axes[1].legend()
    return _common.save_figure(fig, outdir, "lr_transfer", dpi)


def main(argv):
    del argv
    with cli.usage_errors():
        result = run(_common.numbers(FLAGS.widths, int), _common.numbers(FLAGS.log2_lrs, int),
                     FLAGS.steps, FLAGS.batch_size, FLAGS.seq_len, FLAGS.n_layers,
                     FLAGS.n_heads, FLAGS.eval_batches, FLAGS.corpus, FLAGS.seed)
    print(report(result))
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    _common.define_number_list("widths", DEFAULT_WIDTHS, "Model widths d_model; the "
                               "narrowest is μP's base width.", parse=int,
                               check=lambda w: w >= 2, requirement="integers >= 2")
    _common.define_number_list("log2_lrs", DEFAULT_LOG2_LRS, "Grid of log2(peak lr).",
                               parse=int, check=lambda k: True, requirement="integers")
    flags.DEFINE_integer("steps", 100, "Training steps per run.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 8, "Sequences per batch.", lower_bound=1)
    flags.DEFINE_integer("seq_len", 32, "Bytes per sequence.", lower_bound=2)
    flags.DEFINE_integer("n_layers", 2, "Transformer blocks.", lower_bound=1)
    flags.DEFINE_integer("n_heads", 4, "Attention heads (fixed across widths).", lower_bound=1)
    flags.DEFINE_integer("eval_batches", 16, "Validation batches for the final loss.",
                         lower_bound=1)
    flags.DEFINE_string("corpus", "", "Text file or folder; empty = the Python stdlib source.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
