"""Edge of stability: full-batch GD drives the sharpness up to 2/lr, then hovers there.

Classical analysis says GD on a quadratic with top Hessian eigenvalue lambda is stable only
while lambda < 2/lr. Cohen et al. 2021 ("Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability") observed that on neural networks the sharpness (that top
eigenvalue) keeps rising during training ("progressive sharpening") until it reaches 2/lr,
and then stays near 2/lr while the loss keeps falling, non-monotonically.

Here a tanh `models.MLP` fits random one-hot labels of random inputs with the squared loss
under full-batch `optim.sgd` at each --lr; every --sharpness_every steps the sharpness is
measured with `optim.diagnostics.sharpness` (power iteration on Hessian-vector products).
The demo reports sharpness * lr / 2 averaged over the last --tail_fraction of training
(1 = exactly at the edge).

  python -m ravine.experiments.demos.edge_of_stability --lr=0.15,0.3 --steps=2000
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common
from ravine.optim import diagnostics


def random_label_task(examples=256, input_dim=16, classes=10, seed=0):
    """Gaussian inputs [examples, input_dim] and random one-hot targets [examples, classes]."""
    input_key, label_key = jax.random.split(_common.prng_key(seed))
    inputs = jax.random.normal(input_key, (examples, input_dim))
    labels = jax.random.randint(label_key, (examples,), 0, classes)
    return inputs, jax.nn.one_hot(labels, classes)


def squared_loss(model):
    """`loss(params, (inputs, targets))`: half the mean squared error summed over outputs."""

    def loss(params, batch):
        inputs, targets = batch
        return 0.5 * jnp.mean(jnp.sum((model.apply(params, inputs) - targets) ** 2, axis=-1))

    return loss


def setup(width=64, depth=3, examples=256, seed=0):
    """The task, the initial params, the loss and a jitted sharpness of it (shared by all lrs)."""
    batch = random_label_task(examples, seed=seed)
    model = models.MLP(features=(width,) * depth + (batch[1].shape[-1],), activation=jnp.tanh)
    params = nn.unbox(jax.jit(model.init)(_common.prng_key(seed + 1), batch[0]))
    loss_fn = squared_loss(model)
    sharpness_fn = jax.jit(lambda p: diagnostics.sharpness(
        loss_fn, p, batch, iters=20, key=_common.prng_key(seed + 2)))
    return batch, params, loss_fn, sharpness_fn


def train(lr, batch, params, loss_fn, sharpness_fn, steps=2000, sharpness_every=25):
    """Full-batch GD at `lr`; returns measurement steps, sharpness and loss at those steps."""
    tx = optim.sgd(lr)

    @jax.jit
    def train_chunk(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                                   length=sharpness_every)
        return params, opt_state, losses[0]

    opt_state = tx.init(params)
    sharpness, losses = [], []
    for _ in range(steps // sharpness_every):
        sharpness.append(float(sharpness_fn(params)))
        params, opt_state, loss = train_chunk(params, opt_state)
        losses.append(float(loss))
    measured_at = np.arange(len(sharpness)) * sharpness_every
    return measured_at, np.asarray(sharpness), np.asarray(losses)


def run(lrs=(0.15, 0.3), steps=2000, sharpness_every=25, tail_fraction=0.5, width=64, depth=3,
        examples=256, seed=0):
    """Per lr: sharpness and loss curves, and mean sharpness / (2/lr) over the tail."""
    problem = setup(width, depth, examples, seed)
    result = {}
    for lr in lrs:
        at, sharpness, losses = train(lr, *problem, steps, sharpness_every)
        tail = sharpness[-max(1, round(tail_fraction * sharpness.size)):]
        result[lr] = {"steps": at, "sharpness": sharpness, "loss": losses,
                      "tail_ratio": float(np.mean(tail) * lr / 2),
                      "initial_ratio": float(sharpness[0] * lr / 2)}
    return result


def plot(result, outdir, dpi=100):
    fig, (ax_sharp, ax_loss) = _common.plt.subplots(1, 2, figsize=(10, 3.8))
    for lr, r in result.items():
        (line,) = ax_sharp.plot(r["steps"], r["sharpness"], label=f"lr={lr:g}")
        ax_sharp.axhline(2 / lr, color=line.get_color(), ls="--", lw=1)
        ax_loss.semilogy(r["steps"], r["loss"], color=line.get_color(), label=f"lr={lr:g}")
    ax_sharp.set(xlabel="step", ylabel="sharpness (top Hessian eigenvalue)",
                 title="Sharpness rises to 2/lr (dashed) and stays")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Loss keeps falling")
    for ax in (ax_sharp, ax_loss):
        ax.legend()
        ax.grid(True, alpha=0.3)
    return _common.save_figure(fig, outdir, "edge_of_stability", dpi)


def main(argv):
    del argv
    lrs = _common.numbers(FLAGS.lr)
    result = run(lrs, FLAGS.steps, FLAGS.sharpness_every, FLAGS.tail_fraction, FLAGS.width,
                 FLAGS.depth, FLAGS.examples, FLAGS.seed)
    for lr, r in result.items():
        print(f"lr={lr:g}: 2/lr={2 / lr:.3g}, sharpness {r['sharpness'][0]:.3g} at step 0 -> "
              f"{r['sharpness'].max():.3g} max; sharpness*lr/2 over the last "
              f"{FLAGS.tail_fraction:.0%} = {r['tail_ratio']:.3f}; "
              f"loss {r['loss'][0]:.3g} -> {r['loss'][-1]:.3g}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    _common.define_number_list("lr", ["0.15", "0.3"], "Learning rates, one run each.")
    flags.DEFINE_integer("steps", 2000, "Full-batch GD steps.", lower_bound=1)
    flags.DEFINE_integer("sharpness_every", 25, "Steps between sharpness measurements.",
                         lower_bound=1)
    flags.DEFINE_float("tail_fraction", 0.5, "Final fraction of training averaged.",
                       lower_bound=0.01, upper_bound=1.0)
    flags.register_multi_flags_validator(
        ["steps", "sharpness_every"], lambda f: f["steps"] >= f["sharpness_every"],
        message="--steps must be at least --sharpness_every")
    flags.DEFINE_integer("width", 64, "Hidden width.", lower_bound=1)
    flags.DEFINE_integer("depth", 3, "Hidden layers.", lower_bound=1)
    flags.DEFINE_integer("examples", 256, "Training examples (the full batch).", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
