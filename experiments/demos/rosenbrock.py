"""Optimizer race on the Rosenbrock valley f(x, y) = (1 - x)^2 + 100 (y - x^2)^2.

Every racer starts at (-1.5, 2) and takes --steps steps at each learning rate in --lr; the
parameters are one 1x2 matrix [[x, y]], so Shampoo really preconditions (its right factor
is a 2x2 matrix) instead of falling back to its diagonal grafting. The valley floor is
curved and its curvature ranges from ~0.4 to ~1000 at the minimum (1, 1), so:
  * plain GD is unstable above lr ~ 2/1000: at lr 0.01 SGD, momentum and Nesterov blow up
    within a few steps, while Adam (whose step is bounded by ~lr) converges;
  * at lr 0.001 SGD is stable and fast at first (its steps are large where the gradient
    is), but crawls along the flat direction (rate ~ lr * 0.4 per step); Adam, capped at
    ~lr per step, is slower to cross the valley and then normalizes the small gradients
    near the minimum, so it reaches 1e-6 first and ends orders of magnitude lower.
    Momentum and Nesterov, which also speed up the flat direction, win this race;
    Lion's fixed-size sign steps leave it rattling around the minimum instead of settling.
(Rosenbrock 1960; Kingma & Ba 2015; Chen et al. 2023 "Lion"; Gupta et al. 2018 "Shampoo".)

  python -m ravine.experiments.demos.rosenbrock --steps=20000 --lr=0.001,0.01
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common

START = (-1.5, 2.0)
MINIMUM = (1.0, 1.0)
# racer -> (optim registry name, hyperparameters besides the learning rate)
RACERS = {
    "sgd": ("sgd", {}),
    "momentum": ("sgd", {"momentum": 0.9}),
    "nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
    "adam": ("adam", {}),
    "adamw": ("adamw", {}),
    "lion": ("lion", {}),
    "shampoo": ("shampoo", {}),
}


def rosenbrock(params):
    """f at params = [[x, y]]."""
    x, y = params[0, 0], params[0, 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def trajectory(tx, steps):
    """Points (x, y) for t = 0..steps and f after each step, running `tx` from START."""

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(rosenbrock)(params), state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), (params[0], rosenbrock(params))

    start = jnp.asarray([START], jnp.float32)
    _, (points, losses) = jax.jit(
        lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))(start)
    points = np.concatenate([np.asarray(START)[None], np.asarray(points)])
    return points, np.concatenate([[float(rosenbrock(start))], np.asarray(losses)])


def race(lr, steps, racers=tuple(RACERS), target=1e-6):
    """Per racer: trajectory, losses, final loss, divergence and steps to f <= target (inf if
    never reached)."""
    results = {}
    for name in racers:
        optimizer, hparams = RACERS[name]
        points, losses = trajectory(optim.create(optimizer, learning_rate=lr, **hparams), steps)
        final = float(losses[-1])
        results[name] = {
            "points": points, "losses": losses, "final_loss": final,
            "diverged": not np.isfinite(final) or final > losses[0],
            "steps_to_target": float(_common.first_index_at_or_below(losses, target))}
    return results


def plot(races, outdir, dpi=100):
    """Trajectories over log-spaced contours (top) and f per step (bottom), one column per lr."""
    plt = _common.plt
    fig, axes = plt.subplots(2, len(races), figsize=(4.8 * len(races), 8), squeeze=False)
    xs, ys = np.meshgrid(np.linspace(-2, 2, 300), np.linspace(-1, 3, 300))
    f = (1 - xs) ** 2 + 100 * (ys - xs**2) ** 2
    for column, (lr, results) in enumerate(races.items()):
        top, bottom = axes[0, column], axes[1, column]
        top.contour(xs, ys, f, levels=np.logspace(-1, 3.5, 15), cmap="Greys", linewidths=0.6)
        top.plot(*START, "ko")
        top.plot(*MINIMUM, "r*", markersize=12)
        for name, result in results.items():
            outcome = "diverged" if result["diverged"] else f"{result['final_loss']:.1e}"
            label = f"{name} ({outcome})"
            (line,) = top.plot(*result["points"].T, lw=1, label=label)
            bottom.semilogy(result["losses"], color=line.get_color(), lw=0.8)
        top.set(xlim=(-2, 2), ylim=(-1, 3), title=f"lr = {lr:g}", xlabel="x", ylabel="y")
        top.legend(fontsize=7, loc="lower right")
        bottom.set(xlabel="step", ylabel="f", ylim=(1e-14, 1e4))
        bottom.xaxis.set_major_locator(_common.plt.MaxNLocator(5))
        bottom.grid(True, alpha=0.3)
    return _common.save_figure(fig, outdir, "rosenbrock", dpi)


def main(argv):
    del argv
    lrs = _common.numbers(FLAGS.lr)
    races = {lr: race(lr, FLAGS.steps, FLAGS.optimizers, FLAGS.target) for lr in lrs}
    for lr, results in races.items():
        print(f"lr={lr:g}, {FLAGS.steps} steps from {START}")
        target = f"steps to {FLAGS.target:g}"
        print(f"  {'optimizer':<10}{'final f':>12}{'diverged':>10}{target:>16}")
        for name, r in results.items():
            steps_to = f"{r['steps_to_target']:.0f}" if np.isfinite(r["steps_to_target"]) else "-"
            print(f"  {name:<10}{r['final_loss']:>12.3e}{str(r['diverged']):>10}{steps_to:>16}")
    print("saved", plot(races, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 20000, "Steps per racer.", lower_bound=1)
    _common.define_number_list("lr", ["0.001", "0.01"], "Learning rates; one race each.")
    flags.DEFINE_list("optimizers", list(RACERS), f"Racers, from {list(RACERS)}.")
    flags.register_validator("optimizers", lambda names: bool(names) and set(names) <= set(RACERS),
                             message=f"--optimizers must name racers from {list(RACERS)}")
    flags.DEFINE_float("target", 1e-6, "Report the first step with f <= target.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
