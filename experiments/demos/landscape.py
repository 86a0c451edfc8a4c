"""Sharp and flat minima: small-batch SGD, large-batch SGD and Adam trained to the same loss.

Keskar et al. 2017 ("On Large-Batch Training for Deep Learning: Generalization Gap and
Sharp Minima") found that large batches converge to sharper minima (larger Hessian
eigenvalues) that generalise worse, and attributed small-batch SGD's flatter minima to its
gradient noise: an implicit regularisation. Whether Adam shares it is a standing question
(Wilson et al. 2017 found adaptive methods generalising worse). Here, scaled to a CPU:

- Task: inputs x ~ N(0, I) in --input_dim dimensions, labelled by a random tanh teacher
  network (--classes classes, a fraction --label_noise of the training labels replaced by
  random ones), --train_examples to train on and --test_examples held out.
- Student: a ReLU `models.MLP` (--depth hidden layers of --width), softmax cross-entropy.
- Three runs from the same initialisation, each stopped as soon as the full training loss
  (checked every --check_every steps) is <= --target_loss: `optim.sgd` at batch
  --small_batch, `optim.sgd` at the same learning rate and batch --large_batch, and
  `optim.adam` at batch --small_batch.
- At each end point, on the full training set: the top Hessian eigenvalues and the
  spectral density (`optim.diagnostics.hessian_spectrum`: Lanczos and stochastic Lanczos
  quadrature), and 1-D and 2-D slices of the loss along filter-normalised random
  directions (`optim.diagnostics.filter_normalize` / `loss_surface`, Li et al. 2018), the
  same two random directions for all three runs, each normalised by that run's weights.
  "rise@0.5" is the mean training loss at +-0.5 along both directions minus the loss at
  the centre: a flatness measure that, unlike raw eigenvalues, does not change when ReLU
  layers are rescaled (Dinh et al. 2017).

Everything is repeated for --seeds seeds (task, initialisation, batches and directions
change; the three runs of a seed share them). The demo prints each run's numbers and then
answers "does small-batch SGD find flatter minima here, and does Adam?" from the means over
seeds and the number of seeds in which each ordering holds, whatever they say. The plot
shows the first seed. About a minute on 2 CPU cores.

  python -m ravine.experiments.demos.landscape --outdir=docs/demos --dpi=80
"""
import functools
import time
from typing import Callable, NamedTuple

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


class Task(NamedTuple):
    train: tuple  # (inputs [N, d], integer labels [N])
    test: tuple


def make_task(train_examples=1024, test_examples=4096, input_dim=16, classes=4,
              label_noise=0.1, teacher_width=32, seed=0):
    """Teacher-labelled Gaussian inputs; a `label_noise` fraction of train labels random."""
    keys = jax.random.split(_common.prng_key(seed), 5)
    teacher = models.MLP(features=(teacher_width, classes), activation=jnp.tanh)
    inputs = jax.random.normal(keys[0], (train_examples + test_examples, input_dim))
    teacher_params = teacher.init(keys[1], inputs[:1])
    labels = jnp.argmax(teacher.apply(teacher_params, inputs), axis=-1)
    noisy = jax.random.uniform(keys[2], (train_examples,)) < label_noise
    random_labels = jax.random.randint(keys[3], (train_examples,), 0, classes)
    train_labels = jnp.where(noisy, random_labels, labels[:train_examples])
    return Task((inputs[:train_examples], train_labels),
                (inputs[train_examples:], labels[train_examples:]))


def losses_of(model):
    """`loss(params, (x, labels))`: mean softmax cross-entropy; and the error rate."""

    def loss(params, batch):
        inputs, labels = batch
        logits = model.apply(params, inputs)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def error(params, batch):
        inputs, labels = batch
        return jnp.mean(jnp.argmax(model.apply(params, inputs), axis=-1) != labels)

    return loss, error


@functools.partial(jax.jit, static_argnames=("tx", "loss_fn", "batch_size", "max_steps",
                                             "check_every"))
def train_to_target(tx, params, loss_fn, train_set, batch_size, target_loss, max_steps,
                    check_every, key):
    """Minibatch steps (batches drawn with replacement) until the full training loss is at
    most `target_loss`, checked every `check_every` steps, or `max_steps`.

    Returns (params, steps taken, full training loss at the end)."""
    size = train_set[1].shape[0]

    def chunk(carry):
        params, opt_state, step, _ = carry

        def one_step(carry, t):
            params, opt_state = carry
            index = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, size)
            batch = jax.tree.map(lambda a: a[index], train_set)
            grads = jax.grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(one_step, (params, opt_state),
                                              step + jnp.arange(check_every))
        return params, opt_state, step + check_every, loss_fn(params, train_set)

    def not_done(carry):
        _, _, step, loss = carry
        return (loss > target_loss) & (step < max_steps)

    start = (params, tx.init(params), jnp.zeros([], jnp.int32), loss_fn(params, train_set))
    params, _, steps, loss = jax.lax.while_loop(not_done, chunk, start)
    return params, steps, loss


_hessian_spectrum = jax.jit(diagnostics.hessian_spectrum,
                            static_argnames=("loss_fn", "k", "num_lanczos", "num_probes"))
_loss_surface = jax.jit(diagnostics.loss_surface, static_argnames="loss_fn")


def measure(params, loss_fn, error_fn, task, directions, line_coords, coords, num_lanczos,
            num_probes, key):
    """Losses, errors, the Hessian spectrum and the loss slices at `params`: the 1-D ones at
    `line_coords` along the first direction, the 2-D one on `coords` x `coords`."""
    spectrum = _hessian_spectrum(loss_fn, params, task.train, k=5, num_lanczos=num_lanczos,
                                 num_probes=num_probes, key=key)
    grid, density = np.asarray(spectrum.grid, np.float64), np.asarray(spectrum.density)
    top = np.asarray(spectrum.top_eigenvalues, np.float64)
    normalized = [diagnostics.filter_normalize(d, params) for d in directions]
    surface = _loss_surface
    train_loss = float(loss_fn(params, task.train))
    at_half = [surface(loss_fn, params, task.train, [d], jnp.array([-0.5, 0.5]))
               for d in normalized]
    # Eigenvalues within 5% of lambda_1 of zero count as the flat bulk; the Gaussian
    # smoothing (1% of the range) would put half of an exactly-zero bulk below 0.
    near_zero = np.abs(grid) < 0.05 * top[0]
    result = {
        "train_loss": train_loss, "test_loss": float(loss_fn(params, task.test)),
        "train_error": float(error_fn(params, task.train)),
        "test_error": float(error_fn(params, task.test)),
        "top_eigenvalues": top, "grid": grid, "density": density,
        "mean_eigenvalue": float(np.trapezoid(grid * density, grid)),  # tr(H) / n
        "bulk_mass": float(np.trapezoid(np.where(near_zero, density, 0.0), grid)),
        "negative_mass": float(np.trapezoid(np.where(grid < -0.05 * top[0], density, 0.0),
                                            grid)),
        "rise_at_half": float(np.mean(np.concatenate(at_half))) - train_loss,
        "slice_train": np.asarray(surface(loss_fn, params, task.train, normalized[:1],
                                          line_coords)),
        "slice_test": np.asarray(surface(loss_fn, params, task.test, normalized[:1],
                                         line_coords)),
        "surface": np.asarray(surface(loss_fn, params, task.train, normalized, coords)),
    }
    result["gap"] = result["test_loss"] - result["train_loss"]
    return result


class Setup(NamedTuple):
    """What every seed shares: the student, its losses and the three runs' optimizers."""
    model: nn.Module
    loss_fn: Callable
    error_fn: Callable
    runs: dict  # name -> (optax transform, batch size, learning rate)


def make_setup(classes=4, width=64, depth=2, small_batch=16, large_batch=512, sgd_lr=0.1,
               adam_lr=1e-3):
    """Built once, so the jitted training and measurements compile once for all seeds."""
    model = models.MLP(features=(width,) * depth + (classes,), activation=nn.relu)
    sgd = optim.sgd(sgd_lr)
    runs = {f"SGD, batch {small_batch}": (sgd, small_batch, sgd_lr),
            f"SGD, batch {large_batch}": (sgd, large_batch, sgd_lr),
            f"Adam, batch {small_batch}": (optim.adam(adam_lr), small_batch, adam_lr)}
    return Setup(model, *losses_of(model), runs)


def run_seed(setup, seed, train_examples=1024, test_examples=4096, input_dim=16, classes=4,
             label_noise=0.1, target_loss=0.1, max_steps=20000, check_every=50,
             num_lanczos=60, num_probes=4, resolution=21):
    """One seed (task, initialisation, batches, directions): the three runs, measured."""
    task = make_task(train_examples, test_examples, input_dim, classes, label_noise, seed=seed)
    keys = jax.random.split(_common.prng_key(seed + 1000), 5)
    params = nn.unbox(jax.jit(setup.model.init)(keys[0], task.train[0][:1]))
    directions = [optax.tree.random_like(k, params, jax.random.normal) for k in keys[1:3]]
    coords = jnp.linspace(-1.0, 1.0, resolution)
    line_coords = jnp.linspace(-1.0, 1.0, 4 * (resolution - 1) + 1)  # 1-D slices are cheap
    runs = {}
    for name, (tx, batch_size, lr) in setup.runs.items():
        end, steps, loss = train_to_target(tx, params, setup.loss_fn, task.train, batch_size,
                                           target_loss, max_steps, check_every, keys[3])
        runs[name] = {"params": end, "steps": int(steps), "lr": lr,
                      "reached": float(loss) <= target_loss,
                      **measure(end, setup.loss_fn, setup.error_fn, task, directions,
                                line_coords, coords, num_lanczos, num_probes, keys[4])}
    return {"runs": runs, "task": task, "coords": np.asarray(coords),
            "line_coords": np.asarray(line_coords), "num_params": models.count_params(params)}


def run(seeds=(0, 1, 2), classes=4, width=64, depth=2, small_batch=16, large_batch=512,
        sgd_lr=0.1, adam_lr=1e-3, target_loss=0.1, **kwargs):
    """`run_seed` for each seed; returns the per-seed results and the settings."""
    setup = make_setup(classes, width, depth, small_batch, large_batch, sgd_lr, adam_lr)
    per_seed = [run_seed(setup, seed, classes=classes, target_loss=target_loss, **kwargs)
                for seed in seeds]
    return {"seeds": list(seeds), "per_seed": per_seed, "target_loss": target_loss,
            "loss_fn": setup.loss_fn, "num_params": per_seed[0]["num_params"]}


def mean_over_seeds(result, name, key, index=None):
    """The mean over seeds of run `name`'s `key` (its entry `index` when given)."""
    values = [seed["runs"][name][key] for seed in result["per_seed"]]
    return float(np.mean([v if index is None else v[index] for v in values]))


def verdict(result):
    """The measured answers, from the top eigenvalue (mean over seeds, and in how many seeds
    the order holds), with the filter-normalised rise and the generalisation gap beside."""
    small, large, adam = list(result["per_seed"][0]["runs"])
    seeds = len(result["per_seed"])

    def mean(name, key):
        return mean_over_seeds(result, name, key, 0 if key == "top_eigenvalues" else None)

    def lower_in(a, b, key="top_eigenvalues"):
        """Seeds in which run `a` has a smaller `key` (top eigenvalue: λ1) than run `b`."""
        def pick(r):
            return r[key][0] if key == "top_eigenvalues" else r[key]
        return sum(bool(pick(s["runs"][a]) < pick(s["runs"][b])) for s in result["per_seed"])

    def versus(a, b, key, digits=3):
        return f"{mean(a, key):.{digits}g} vs {mean(b, key):.{digits}g}"

    def smaller(a, b, key):
        return "smaller" if mean(a, key) < mean(b, key) else "larger"

    sb_lb = lower_in(small, large)
    answer = "Yes" if sb_lb == seeds else "No" if sb_lb == 0 else "Mixed"
    first = (f"Does small-batch SGD find flatter minima here? {answer}: top eigenvalue "
             f"{versus(small, large, 'top_eigenvalues')} for large-batch SGD (lower in "
             f"{sb_lb} of {seeds} seeds), filter-normalised rise@0.5 "
             f"{versus(small, large, 'rise_at_half')} (lower in "
             f"{lower_in(small, large, 'rise_at_half')} of {seeds}); its generalisation gap "
             f"is {smaller(small, large, 'gap')} ({versus(small, large, 'gap')}) and its test "
             f"error {smaller(small, large, 'test_error')} "
             f"({versus(small, large, 'test_error')}).")
    adam_sb, adam_lb = lower_in(adam, small), lower_in(adam, large)
    if adam_sb == seeds:
        answer = "Yes, flatter even than small-batch SGD"
    elif adam_sb == 0 and adam_lb == seeds:
        answer = "Halfway: flatter than large-batch SGD, sharper than small-batch SGD"
    elif adam_sb == 0 and adam_lb == 0:
        answer = "No, sharper than both SGD runs"
    else:
        answer = "Mixed"
    second = (f"Does Adam? {answer}, by the top eigenvalue: {mean(adam, 'top_eigenvalues'):.3g}"
              f" (lower than small-batch SGD in {adam_sb} of {seeds} seeds, than large-batch "
              f"SGD in {adam_lb}); rise@0.5 {mean(adam, 'rise_at_half'):.3g} (lower in "
              f"{lower_in(adam, small, 'rise_at_half')} and "
              f"{lower_in(adam, large, 'rise_at_half')} of {seeds}); gap "
              f"{mean(adam, 'gap'):.3g}, test error {mean(adam, 'test_error'):.3g}.")
    return first, second


def plot(result, outdir, dpi=100):
    """The first seed: 1-D slices (train solid, test dashed), the spectral densities, and
    2-D train-loss contours per run (shared log-spaced levels)."""
    first = result["per_seed"][0]
    runs, coords, line_coords = first["runs"], first["coords"], first["line_coords"]
    fig, axes = _common.plt.subplots(1, 2 + len(runs), figsize=(4.0 * (2 + len(runs)), 3.8))
    ax_line, ax_density, ax_surfaces = axes[0], axes[1], axes[2:]
    top = max(float(np.max(r["surface"])) for r in runs.values())
    bottom = min(float(np.min(r["surface"])) for r in runs.values())
    levels = np.geomspace(max(bottom, 1e-3), top, 14)
    for (name, r), ax in zip(runs.items(), ax_surfaces):
        (line,) = ax_line.plot(line_coords, r["slice_train"], label=f"{name} (train)")
        ax_line.plot(line_coords, r["slice_test"], ls="--", color=line.get_color(),
                     label=f"{name} (test)")
        ax_density.semilogy(r["grid"], np.maximum(r["density"], 1e-6), color=line.get_color(),
                            label=f"{name}: λ1={r['top_eigenvalues'][0]:.3g}")
        contour = ax.contour(coords, coords, r["surface"].T, levels=levels, cmap="viridis",
                             norm=_common.matplotlib.colors.LogNorm())
        ax.clabel(contour, fontsize=6, fmt="%.2g")
        ax.plot(0, 0, "k+")
        ax.set(xlabel="direction 1", ylabel="direction 2",
               title=f"{name}: λ1={r['top_eigenvalues'][0]:.3g}, gap={r['gap']:.2f}")
    ax_line.set(xlabel="step along filter-normalised direction 1", ylabel="loss",
                title=f"1-D slices at train loss ≈ {result['target_loss']:g} (seed "
                      f"{result['seeds'][0]})", yscale="log")
    ax_density.set(xlabel="Hessian eigenvalue", ylabel="density (SLQ)", ylim=(1e-6, None),
                   title="Hessian spectral density")
    for ax in (ax_line, ax_density):
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _common.save_figure(fig, outdir, "landscape", dpi)


COLUMNS = ("run", "seed", "lr", "steps", "train", "test", "gap", "err tr/te", "λ1",
           "λ2 λ3 λ4 λ5", "mean λ", "bulk", "λ<0", "rise@0.5")
WIDTHS = (16, 4, 6, 6, 7, 7, 7, 11, 7, 23, 8, 6, 6, 8)


def row(name, seed, r):
    """One printed table row: the numbers of run `name` at `seed`, columns space-separated."""
    cells = (name, f"{seed:d}", f"{r['lr']:.3g}", f"{r['steps']:d}", f"{r['train_loss']:.4f}",
             f"{r['test_loss']:.4f}", f"{r['gap']:.4f}",
             f"{r['train_error']:.3f}/{r['test_error']:.3f}", f"{r['top_eigenvalues'][0]:.3g}",
             " ".join(f"{x:.3g}" for x in r["top_eigenvalues"][1:]),
             f"{r['mean_eigenvalue']:.3g}", f"{r['bulk_mass']:.3f}", f"{r['negative_mass']:.3f}",
             f"{r['rise_at_half']:.3g}")
    note = "" if r["reached"] else "  (did not reach the target)"
    return "  " + " ".join(c.rjust(w) if i else c.ljust(w)
                           for i, (c, w) in enumerate(zip(cells, WIDTHS))) + note


def report(result):
    """The lines the demo prints: a table row per run and seed, then the verdict."""
    lines = [f"{result['num_params']} parameters; every run stops at full training loss <= "
             f"{result['target_loss']:g}. λ1..λ5: top Hessian eigenvalues (Lanczos); mean λ "
             f"= tr(H)/n, bulk = density mass with |λ| < 0.05 λ1, λ<0 = mass below "
             f"-0.05 λ1 (SLQ); rise@0.5: filter-normalised slices",
             "  " + " ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(COLUMNS, WIDTHS)))]
    for name in result["per_seed"][0]["runs"]:
        for seed, per_seed in zip(result["seeds"], result["per_seed"]):
            lines.append(row(name, seed, per_seed["runs"][name]))
    lines.extend(verdict(result))
    return lines


def define_flags(flag_values=flags.FLAGS):
    """The demo's flags, on `flag_values` (a fresh `flags.FlagValues()` in tests)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_integer("train_examples", 1024, "Training set size.", lower_bound=2, **fv)
    flags.DEFINE_integer("test_examples", 4096, "Held-out set size.", lower_bound=1, **fv)
    flags.DEFINE_integer("input_dim", 16, "Input dimension.", lower_bound=1, **fv)
    flags.DEFINE_integer("classes", 4, "Number of classes.", lower_bound=2, **fv)
    flags.DEFINE_float("label_noise", 0.1, "Fraction of training labels made random.",
                       lower_bound=0.0, upper_bound=1.0, **fv)
    flags.DEFINE_integer("width", 64, "Hidden width of the student.", lower_bound=1, **fv)
    flags.DEFINE_integer("depth", 2, "Hidden layers of the student.", lower_bound=1, **fv)
    flags.DEFINE_integer("small_batch", 16, "Batch of small-batch SGD and Adam.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("large_batch", 512, "Batch of large-batch SGD.", lower_bound=1, **fv)
    flags.DEFINE_float("sgd_lr", 0.1, "Learning rate of both SGD runs.", lower_bound=0.0, **fv)
    flags.DEFINE_float("adam_lr", 1e-3, "Learning rate of Adam.", lower_bound=0.0, **fv)
    flags.DEFINE_float("target_loss", 0.1, "Training loss at which every run stops.",
                       lower_bound=0.0, **fv)
    flags.DEFINE_integer("max_steps", 20000, "Step budget per run.", lower_bound=1, **fv)
    flags.DEFINE_integer("check_every", 50, "Steps between checks of the training loss.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("num_lanczos", 60, "Lanczos steps per probe.", lower_bound=5, **fv)
    flags.DEFINE_integer("num_probes", 4, "SLQ probe vectors.", lower_bound=1, **fv)
    flags.DEFINE_integer("resolution", 21, "Points per axis of the slices in [-1, 1].",
                         lower_bound=3, **fv)
    flags.DEFINE_integer("seeds", 3, "Number of seeds (0, 1, ...): task, init and batches.",
                         lower_bound=1, **fv)
    flags.register_multi_flags_validator(
        ["small_batch", "large_batch"], lambda f: f["small_batch"] < f["large_batch"],
        message="--small_batch must be smaller than --large_batch", **fv)
    _common.define_output_flags(flag_values)


def demo(flag_values):
    """Runs the demo with parsed `flag_values`, prints its report and returns the result."""
    f = flag_values
    start = time.perf_counter()
    result = run(tuple(range(f.seeds)), f.classes, f.width, f.depth, f.small_batch,
                 f.large_batch, f.sgd_lr, f.adam_lr, f.target_loss,
                 train_examples=f.train_examples, test_examples=f.test_examples,
                 input_dim=f.input_dim, label_noise=f.label_noise, max_steps=f.max_steps,
                 check_every=f.check_every, num_lanczos=f.num_lanczos,
                 num_probes=f.num_probes, resolution=f.resolution)
    for line in report(result):
        print(line)
    print("saved", plot(result, f.outdir, f.dpi))
    print(f"total {time.perf_counter() - start:.0f} s")
    return result


def main(argv):
    del argv
    demo(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
