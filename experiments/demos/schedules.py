"""Learning-rate schedules from `optim.schedules` and the area under each.

Plots constant, linear, warmup-cosine, warmup-stable-decay (WSD) with its three cooldown
shapes, and SGDR (cosine with warm restarts) over `total_steps`, and prints each schedule's
learning-rate budget sum_{t < T} lr(t) next to the closed-form integral of lr over [0, T]:
  warmup (linear 0 -> peak over W):     peak * W / 2
  linear decay peak -> end over L:      L * (peak + end) / 2
  half cosine peak -> end over L:       L * (peak + end) / 2
  WSD cooldown over D, shape g:         D * (end + (peak - end) * int_0^1 g), int g = 1/2
                                        for "linear" and "cosine", 1/3 for "sqrt" (1 - sqrt f)
  SGDR period P cut after tau steps:    tau * end + (peak - end) * (tau/2 + P/(2 pi) sin(pi tau/P))
The left Riemann sum differs from the integral by O(peak) per monotone piece, so the two
agree to ~0.1% at T = 1000. The area is what a schedule spends: WSD keeps far more of it
than cosine at the same peak, and the "sqrt" tail gives up the least.

  python -m ravine.experiments.demos.schedules --total_steps=1000 --warmup_steps=100 --peak_lr=1e-3
"""
import math

import jax.numpy as jnp
import numpy as np
from absl import flags

from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common
from ravine.optim import schedules

WSD_TAIL_MEANS = {"linear": 0.5, "cosine": 0.5, "sqrt": 1.0 / 3.0}  # int_0^1 g(f) df


def _sgdr_area(peak, end, first_period, period_mult, length):
    """Closed-form integral of SGDR's restarting half cosines over `length` steps."""
    area, start, period = 0.0, 0.0, float(first_period)
    while start < length:
        tau = min(period, length - start)
        area += tau * end + (peak - end) * (
            tau / 2 + period / (2 * math.pi) * math.sin(math.pi * tau / period))
        start, period = start + period, period * period_mult
    return area


def build(total_steps=1000, warmup_steps=100, peak_lr=1e-3, wsd_decay_steps=200,
          sgdr_first_period=100, sgdr_period_mult=2.0):
    """{name: (schedule, closed-form area over [0, total_steps])} for every schedule shown."""
    big_t, w, peak = total_steps, warmup_steps, peak_lr
    warmup_area = peak * w / 2
    cosine_end = 0.1 * peak  # warmup_cosine's default end_value
    result = {
        "constant": (schedules.constant(peak), peak * big_t),
        "linear": (schedules.linear(peak, big_t, w), warmup_area + (big_t - w) * peak / 2),
        "warmup_cosine": (schedules.warmup_cosine(peak, big_t, w),
                          warmup_area + (big_t - w) * (peak + cosine_end) / 2),
    }
    for shape, mean in WSD_TAIL_MEANS.items():
        result[f"wsd_{shape}"] = (
            schedules.wsd(peak, big_t, w, wsd_decay_steps, decay_shape=shape),
            warmup_area + (big_t - w - wsd_decay_steps) * peak + wsd_decay_steps * peak * mean)
    result["sgdr"] = (
        schedules.cosine_restarts(peak, sgdr_first_period, sgdr_period_mult, warmup_steps=w),
        warmup_area + _sgdr_area(peak, 0.0, sgdr_first_period, sgdr_period_mult, big_t - w))
    return result


def run(total_steps=1000, warmup_steps=100, peak_lr=1e-3, wsd_decay_steps=200,
        sgdr_first_period=100, sgdr_period_mult=2.0):
    """Learning rates at every step, the sum over steps and the closed-form area per schedule."""
    steps = jnp.arange(total_steps)
    built = build(total_steps, warmup_steps, peak_lr, wsd_decay_steps, sgdr_first_period,
                  sgdr_period_mult)
    curves = {name: np.asarray(schedule(steps)) for name, (schedule, _) in built.items()}
    return {"steps": np.asarray(steps), "curves": curves,
            "sums": {name: float(np.sum(curve, dtype=np.float64))
                     for name, curve in curves.items()},
            "areas": {name: area for name, (_, area) in built.items()}}


def plot(result, outdir, dpi=100):
    fig, axes = _common.plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name, curve in result["curves"].items():
        ax = axes[1] if name.startswith("wsd") else axes[0]
        ax.plot(result["steps"], curve, label=f"{name} (area {result['sums'][name]:.3g})")
    axes[0].set_title("constant, linear, warmup-cosine, SGDR")
    axes[1].set_title("WSD: three cooldown shapes")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("learning rate")
    return _common.save_figure(fig, outdir, "schedules", dpi)


def main(argv):
    del argv
    result = run(FLAGS.total_steps, FLAGS.warmup_steps, FLAGS.peak_lr, FLAGS.wsd_decay_steps,
                 FLAGS.sgdr_first_period, FLAGS.sgdr_period_mult)
    print(f"T={FLAGS.total_steps}, W={FLAGS.warmup_steps}, peak={FLAGS.peak_lr:g}")
    print(f"  {'schedule':<14}{'sum_t lr(t)':>14}{'closed form':>14}{'rel.diff':>10}"
          f"{'/ constant':>12}")
    constant = result["sums"]["constant"]
    for name, total in result["sums"].items():
        area = result["areas"][name]
        print(f"  {name:<14}{total:>14.6g}{area:>14.6g}{abs(total - area) / area:>10.2e}"
              f"{total / constant:>12.3f}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    flags.DEFINE_integer("total_steps", 1000, "T.", lower_bound=1)
    flags.DEFINE_integer("warmup_steps", 100, "W.", lower_bound=0)
    flags.DEFINE_float("peak_lr", 1e-3, "Peak learning rate.", lower_bound=0.0)
    flags.DEFINE_integer("wsd_decay_steps", 200, "WSD cooldown length.", lower_bound=0)
    flags.DEFINE_integer("sgdr_first_period", 100, "SGDR's first period.", lower_bound=1)
    flags.DEFINE_float("sgdr_period_mult", 2.0, "SGDR's period growth.", lower_bound=1.0)
    flags.register_multi_flags_validator(
        ["total_steps", "warmup_steps", "wsd_decay_steps"],
        lambda f: f["warmup_steps"] + f["wsd_decay_steps"] <= f["total_steps"],
        message="--warmup_steps + --wsd_decay_steps must be <= --total_steps")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
