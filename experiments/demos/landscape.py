"""Sharp and flat minima: small- and large-batch SGD, Adam and AdamW trained to the same loss.

Keskar et al. 2017 ("On Large-Batch Training for Deep Learning: Generalization Gap and
Sharp Minima") found that large batches converge to sharper minima (larger Hessian
eigenvalues) that generalise worse, and attributed small-batch SGD's flatter minima to its
gradient noise: an implicit regularisation. Whether Adam shares it is a standing question
(Wilson et al. 2017 found adaptive methods generalising worse; the seed's lecture says
"Adam finds sharper minima"), and so is what decoupled weight decay changes. Here, scaled
to a CPU:

- Task: inputs x ~ N(0, I) in --input_dim dimensions, labelled by a random tanh teacher
  network (--classes classes, a fraction --label_noise of the training labels replaced by
  random ones), --train_examples to train on and --test_examples held out.
- Student: a ReLU `models.MLP` (--depth hidden layers of --width), softmax cross-entropy.
- Four runs from the same initialisation, each stopped as soon as the full training loss
  (checked every --check_every steps) is <= --target_loss: `optim.sgd` at batch
  --small_batch, `optim.sgd` at the same learning rate and batch --large_batch,
  `optim.adam` at batch --small_batch, and `optim.adamw` (decoupled decay --weight_decay,
  scaled by the lr, biases included) at batch --small_batch and Adam's learning rate.
- At each end point, on the full training set: the top Hessian eigenvalues and the
  spectral density (`optim.diagnostics.hessian_spectrum`: Lanczos and stochastic Lanczos
  quadrature), and 1-D and 2-D slices of the loss along filter-normalised random
  directions (`optim.diagnostics.filter_normalize` / `loss_surface`, Li et al. 2018), the
  same two random directions for all runs, each normalised by that run's weights.
  "rise@0.5" is the mean training loss at +-0.5 along both directions minus the loss at
  the centre, and "curv" the filter-normalised 1-D curvature d^T H d (the second
  derivative of the 1-D slice at 0, exact by a Hessian-vector product), averaged over the
  two directions: flatness measures that, unlike raw eigenvalues, do not change when ReLU
  layers are rescaled (Dinh et al. 2017).

Everything is repeated for --seeds seeds (task, initialisation, batches and directions
change; the runs of a seed share them). For the top eigenvalue λ1 and the curvature the
demo gives each run's mean over seeds with a 95% Student-t interval, and for every pair
of runs the mean paired difference (paired by seed) with its 95% interval and the
two-sided paired t-test p-value (`experiments.race_stats`). The ordering it prints joins
neighbours with "<" where the paired test separates them (p < 0.05) and "~" where it does
not. Then it answers "does small-batch SGD find flatter minima here, does Adam, and what
does AdamW's decay change?" from those tests, whatever they say, and writes the numbers to
<outdir>/landscape.json. The plot shows the first seed's slices, spectra and surfaces and
every seed's λ1 and curvature. About a minute on 2 CPU cores. The p-values are not
corrected for the 12 comparisons (6 pairs, 2 measures): at Bonferroni's 0.05 / 12 = 0.0042
fewer pairs would count as separated; the printed p-values allow either reading.

Measured (2-core CPU, default flags, 5 seeds; docs/demos/landscape.json): small-batch SGD
is flatter than large-batch SGD by both measures (λ1 4.10 ± 0.51 vs 8.43 ± 0.84, paired
p = 0.0006; curvature 4.18 vs 6.31, p = 0.0014). Adam is sharper than small-batch SGD by
λ1 (4.77 ± 0.63, higher in 5 of 5 seeds, p = 0.022: the seed's "Adam finds sharper
minima", though not at the corrected level) but not by the curvature (4.33, p = 0.47), and
far flatter than large-batch SGD. AdamW (decay 0.1) is flatter than Adam by both (λ1 4.20
± 0.19, p = 0.027; curvature 3.59, p = 0.0018) and by the curvature even flatter than
small-batch SGD (p = 0.0038). Orderings: λ1: SGD 16 ~ AdamW < Adam < SGD 512; curvature:
AdamW < SGD 16 ~ Adam < SGD 512.

  python -m ravine.experiments.demos.landscape --outdir=docs/demos --dpi=80
"""
import functools
import itertools
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
from ravine.experiments import race_stats
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


@functools.partial(jax.jit, static_argnames="loss_fn")
def directional_curvature(loss_fn, params, batch, direction):
    """d^T H d: the second derivative of `a -> loss_fn(params + a d, batch)` at a = 0."""
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    return optax.tree.vdot(direction, jax.jvp(grad_fn, (params,), (direction,))[1])


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
        "directions": normalized,
        "curvature": float(np.mean([directional_curvature(loss_fn, params, task.train, d)
                                    for d in normalized])),
        "slice_train": np.asarray(surface(loss_fn, params, task.train, normalized[:1],
                                          line_coords)),
        "slice_test": np.asarray(surface(loss_fn, params, task.test, normalized[:1],
                                         line_coords)),
        "surface": np.asarray(surface(loss_fn, params, task.train, normalized, coords)),
    }
    result["gap"] = result["test_loss"] - result["train_loss"]
    return result


WEIGHT_DECAY = 0.1  # AdamW's default decay, the usual one for language models


class Setup(NamedTuple):
    """What every seed shares: the student, its losses and the runs' optimizers."""
    model: nn.Module
    loss_fn: Callable
    error_fn: Callable
    runs: dict  # name -> (optax transform, batch size, learning rate)


def make_setup(classes=4, width=64, depth=2, small_batch=16, large_batch=512, sgd_lr=0.1,
               adam_lr=1e-3, weight_decay=WEIGHT_DECAY):
    """Built once, so the jitted training and measurements compile once for all seeds.

    The runs, in the order every table and test lists them: small-batch SGD, large-batch
    SGD, Adam, AdamW (Adam's batch and lr, plus decay)."""
    model = models.MLP(features=(width,) * depth + (classes,), activation=nn.relu)
    sgd = optim.sgd(sgd_lr)
    runs = {f"SGD, batch {small_batch}": (sgd, small_batch, sgd_lr),
            f"SGD, batch {large_batch}": (sgd, large_batch, sgd_lr),
            f"Adam, batch {small_batch}": (optim.adam(adam_lr), small_batch, adam_lr),
            f"AdamW, batch {small_batch}": (optim.adamw(adam_lr, weight_decay=weight_decay),
                                            small_batch, adam_lr)}
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


def run(seeds=(0, 1, 2, 3, 4), classes=4, width=64, depth=2, small_batch=16, large_batch=512,
        sgd_lr=0.1, adam_lr=1e-3, target_loss=0.1, weight_decay=WEIGHT_DECAY, **kwargs):
    """`run_seed` for each seed; returns the per-seed results, their statistics (`compare`)
    and the settings."""
    setup = make_setup(classes, width, depth, small_batch, large_batch, sgd_lr, adam_lr,
                       weight_decay)
    per_seed = [run_seed(setup, seed, classes=classes, target_loss=target_loss, **kwargs)
                for seed in seeds]
    result = {"seeds": list(seeds), "per_seed": per_seed, "target_loss": target_loss,
              "weight_decay": weight_decay, "loss_fn": setup.loss_fn,
              "num_params": per_seed[0]["num_params"]}
    result["stats"] = compare(result)
    return result


def mean_over_seeds(result, name, key, index=None):
    """The mean over seeds of run `name`'s `key` (its entry `index` when given)."""
    values = [seed["runs"][name][key] for seed in result["per_seed"]]
    return float(np.mean([v if index is None else v[index] for v in values]))


# The flatness measures with intervals and paired tests: key -> (label, value of one run).
METRICS = {"top_eigenvalue": ("λ1", lambda r: r["top_eigenvalues"][0]),
           "curvature": ("curvature", lambda r: r["curvature"])}
ALPHA = 0.05  # paired tests with p below this separate two runs


def compare(result):
    """Per metric of METRICS: each run's per-seed values with their mean and 95% Student-t
    half width, and for every pair (a, b) of runs the paired differences a - b: their mean
    and 95% half width, the two-sided paired t-test p-value and the seeds with a < b; and
    the runs ordered by mean (`ordering`)."""
    names = list(result["per_seed"][0]["runs"])
    stats = {}
    for metric, (_, value) in METRICS.items():
        values = {n: [float(value(s["runs"][n])) for s in result["per_seed"]] for n in names}
        runs = {}
        for name in names:
            mean, half, _ = race_stats.mean_ci(values[name])
            runs[name] = {"values": values[name], "mean": mean, "ci": half}
        pairs = {}
        for a, b in itertools.combinations(names, 2):
            mean, half, _ = race_stats.mean_ci([x - y for x, y in zip(values[a], values[b])])
            pairs[(a, b)] = {"difference": mean, "ci": half,
                             "p": race_stats.paired_p_value(values[a], values[b]),
                             "lower_in": sum(x < y for x, y in zip(values[a], values[b]))}
        stats[metric] = {"runs": runs, "pairs": pairs, "ordering": ordering(runs, pairs)}
    return stats


def pair(stats, metric, a, b):
    """The paired comparison of runs a and b (a - b), whichever order `compare` stored."""
    pairs = stats[metric]["pairs"]
    if (a, b) in pairs:
        return pairs[(a, b)]
    flipped = pairs[(b, a)]
    seeds = len(stats[metric]["runs"][a]["values"])
    return {**flipped, "difference": -flipped["difference"],
            "lower_in": seeds - flipped["lower_in"]}  # ties (equal values) aside


def ordering(runs, pairs):
    """Runs from the smallest mean to the largest, neighbours joined by "<" when the paired
    test separates them (p < ALPHA) and by "~" when it does not."""
    names = sorted(runs, key=lambda n: runs[n]["mean"])
    text = names[0]
    for a, b in zip(names, names[1:]):
        p = pairs[(a, b)]["p"] if (a, b) in pairs else pairs[(b, a)]["p"]
        text += (" < " if p < ALPHA else " ~ ") + b
    return text


def answer(stats, a, b, metric="top_eigenvalue"):
    """How run a's minima compare with run b's by `metric`'s paired test: "flatter than",
    "sharper than" or "not separated from"."""
    compared = pair(stats, metric, a, b)
    if not compared["p"] < ALPHA:
        return "not separated from"
    return "flatter than" if compared["difference"] < 0 else "sharper than"


def verdict(result):
    """The measured answers: by the top eigenvalue (means over seeds, paired differences
    with their 95% intervals and p-values, seeds in which the order holds), with the
    filter-normalised curvature, rise@0.5 and the generalisation gap beside."""
    small, large, adam, adamw = list(result["per_seed"][0]["runs"])
    seeds, stats = len(result["per_seed"]), result["stats"]

    def mean(name, key):
        return mean_over_seeds(result, name, key, 0 if key == "top_eigenvalues" else None)

    def versus(a, b, key, digits=3):
        return f"{mean(a, key):.{digits}g} vs {mean(b, key):.{digits}g}"

    def smaller(a, b, key):
        return "smaller" if mean(a, key) < mean(b, key) else "larger"

    def paired(a, b, metric):
        c = pair(stats, metric, a, b)
        return (f"difference {c['difference']:+.3g} ± {c['ci']:.2g}, p = {c['p']:.2g}, "
                f"lower in {c['lower_in']} of {seeds}")

    def rise_lower(a, b):
        return sum(s["runs"][a]["rise_at_half"] < s["runs"][b]["rise_at_half"]
                   for s in result["per_seed"])

    top = pair(stats, "top_eigenvalue", small, large)
    word = {"flatter than": "Yes", "sharper than": "No, sharper",
            "not separated from": "Not separated"}
    first = (f"Does small-batch SGD find flatter minima here? {word[answer(stats, small, large)]}"
             f": top eigenvalue {versus(small, large, 'top_eigenvalues')} for large-batch SGD "
             f"(lower in {top['lower_in']} of {seeds} seeds; paired difference "
             f"{top['difference']:+.3g} ± {top['ci']:.2g}, p = {top['p']:.2g}), curvature "
             f"{versus(small, large, 'curvature')} ({paired(small, large, 'curvature')}), "
             f"rise@0.5 {versus(small, large, 'rise_at_half')} (lower in "
             f"{rise_lower(small, large)} of {seeds}); its generalisation gap is "
             f"{smaller(small, large, 'gap')} ({versus(small, large, 'gap')}) and its test "
             f"error {smaller(small, large, 'test_error')} "
             f"({versus(small, large, 'test_error')}).")
    word = {"sharper than": "Yes", "flatter than": "No, flatter",
            "not separated from": "Not separated"}
    second = (f"Does Adam find sharper minima (the seed's claim)? "
              f"{word[answer(stats, adam, small)]}: by the top eigenvalue "
              f"{mean(adam, 'top_eigenvalues'):.3g} it is {answer(stats, adam, small)} "
              f"small-batch SGD ({paired(adam, small, 'top_eigenvalue')}) and "
              f"{answer(stats, adam, large)} large-batch SGD "
              f"({paired(adam, large, 'top_eigenvalue')}); by the curvature "
              f"{mean(adam, 'curvature'):.3g} it is {answer(stats, adam, small, 'curvature')} "
              f"small-batch SGD ({paired(adam, small, 'curvature')}); gap "
              f"{mean(adam, 'gap'):.3g}, test error {mean(adam, 'test_error'):.3g}.")
    third = (f"What does AdamW's decay (weight decay {result['weight_decay']:g}) change? By the "
             f"top eigenvalue {mean(adamw, 'top_eigenvalues'):.3g} it is "
             f"{answer(stats, adamw, adam)} Adam ({paired(adamw, adam, 'top_eigenvalue')}) and "
             f"{answer(stats, adamw, small)} small-batch SGD "
             f"({paired(adamw, small, 'top_eigenvalue')}); by the curvature "
             f"{mean(adamw, 'curvature'):.3g} it is {answer(stats, adamw, adam, 'curvature')} "
             f"Adam ({paired(adamw, adam, 'curvature')}); gap {mean(adamw, 'gap'):.3g}, test "
             f"error {mean(adamw, 'test_error'):.3g}.")
    orders = [f"Ordering by {label} (mean over seeds; '<' = paired p < {ALPHA:g}): "
              f"{stats[metric]['ordering']}" for metric, (label, _) in METRICS.items()]
    return (first, second, third, *orders)


def interval_lines(result):
    """Per metric: each run's mean ± 95% half width, then every pair's paired test."""
    lines = []
    for metric, (label, _) in METRICS.items():
        stats = result["stats"][metric]
        lines.append(f"{label}: mean ± 95% t interval over {len(result['seeds'])} seeds")
        lines += [f"  {name:<18}{r['mean']:9.4g} ± {r['ci']:.3g}"
                  for name, r in stats["runs"].items()]
        lines.append(f"{label}: paired differences a - b (by seed), mean ± 95% t interval, "
                     f"paired t-test p")
        lines += [f"  {a + ' - ' + b:<38}{c['difference']:+9.4g} ± {c['ci']:.3g}  "
                  f"p = {c['p']:.3g}" for (a, b), c in stats["pairs"].items()]
    return lines


def plot(result, outdir, dpi=100):
    """Top: the first seed's 1-D slices (train solid, test dashed) and spectral densities,
    and every seed's λ1 and curvature per run (dots) with the mean and its 95% interval.
    Bottom: the first seed's 2-D train-loss contours per run (shared log-spaced levels)."""
    first = result["per_seed"][0]
    runs, coords, line_coords = first["runs"], first["coords"], first["line_coords"]
    columns = max(4, len(runs))
    fig, axes = _common.plt.subplots(2, columns, figsize=(4.0 * columns, 7.6))
    ax_line, ax_density, ax_top, ax_curvature = axes[0, :4]
    for ax in axes[0, 4:]:
        ax.axis("off")
    top = max(float(np.max(r["surface"])) for r in runs.values())
    bottom = min(float(np.min(r["surface"])) for r in runs.values())
    levels = np.geomspace(max(bottom, 1e-3), top, 14)
    for i, ((name, r), ax) in enumerate(zip(runs.items(), axes[1])):
        (line,) = ax_line.plot(line_coords, r["slice_train"], label=f"{name} (train)")
        ax_line.plot(line_coords, r["slice_test"], ls="--", color=line.get_color(),
                     label=f"{name} (test)")
        ax_density.semilogy(r["grid"], np.maximum(r["density"], 1e-6), color=line.get_color(),
                            label=f"{name}: λ1={r['top_eigenvalues'][0]:.3g}")
        for metric, ax_metric in (("top_eigenvalue", ax_top), ("curvature", ax_curvature)):
            stats = result["stats"][metric]["runs"][name]
            ax_metric.plot(np.full(len(stats["values"]), i), stats["values"], "o", alpha=0.4,
                           color=line.get_color())
            ax_metric.errorbar(i + 0.2, stats["mean"], yerr=stats["ci"], fmt="s", capsize=4,
                               color=line.get_color())
        contour = ax.contour(coords, coords, r["surface"].T, levels=levels, cmap="viridis",
                             norm=_common.matplotlib.colors.LogNorm())
        ax.clabel(contour, fontsize=6, fmt="%.2g")
        ax.plot(0, 0, "k+")
        ax.set(xlabel="direction 1", ylabel="direction 2",
               title=f"{name}: λ1={r['top_eigenvalues'][0]:.3g}, gap={r['gap']:.2f}")
    for ax in axes[1, len(runs):]:
        ax.axis("off")
    ax_line.set(xlabel="step along filter-normalised direction 1", ylabel="loss",
                title=f"1-D slices at train loss ≈ {result['target_loss']:g} (seed "
                      f"{result['seeds'][0]})", yscale="log")
    ax_density.set(xlabel="Hessian eigenvalue", ylabel="density (SLQ)", ylim=(1e-6, None),
                   title="Hessian spectral density")
    labels = [name.replace(", ", "\n") for name in runs]
    seeds = len(result["seeds"])
    for ax, title in ((ax_top, f"top eigenvalue λ1, {seeds} seeds"),
                      (ax_curvature, f"curvature d^T H d, {seeds} seeds")):
        ax.set_xticks(range(len(runs)), labels, fontsize=7)
        ax.set(title=title, ylabel="per seed; squares: mean ± 95% CI")
        ax.grid(True, alpha=0.3)
    for ax in (ax_line, ax_density):
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _common.save_figure(fig, outdir, "landscape", dpi)


COLUMNS = ("run", "seed", "lr", "steps", "train", "test", "gap", "err tr/te", "λ1",
           "λ2 λ3 λ4 λ5", "mean λ", "bulk", "λ<0", "rise@0.5", "curv")
WIDTHS = (17, 4, 6, 6, 7, 7, 7, 11, 7, 23, 8, 6, 6, 8, 8)


def row(name, seed, r):
    """One printed table row: the numbers of run `name` at `seed`, columns space-separated."""
    cells = (name, f"{seed:d}", f"{r['lr']:.3g}", f"{r['steps']:d}", f"{r['train_loss']:.4f}",
             f"{r['test_loss']:.4f}", f"{r['gap']:.4f}",
             f"{r['train_error']:.3f}/{r['test_error']:.3f}", f"{r['top_eigenvalues'][0]:.3g}",
             " ".join(f"{x:.3g}" for x in r["top_eigenvalues"][1:]),
             f"{r['mean_eigenvalue']:.3g}", f"{r['bulk_mass']:.3f}", f"{r['negative_mass']:.3f}",
             f"{r['rise_at_half']:.3g}", f"{r['curvature']:.3g}")
    note = "" if r["reached"] else "  (did not reach the target)"
    return "  " + " ".join(c.rjust(w) if i else c.ljust(w)
                           for i, (c, w) in enumerate(zip(cells, WIDTHS))) + note


def report(result):
    """The lines the demo prints: a table row per run and seed, the intervals and paired
    tests, then the verdict."""
    lines = [f"{result['num_params']} parameters; every run stops at full training loss <= "
             f"{result['target_loss']:g}. λ1..λ5: top Hessian eigenvalues (Lanczos); mean λ "
             f"= tr(H)/n, bulk = density mass with |λ| < 0.05 λ1, λ<0 = mass below "
             f"-0.05 λ1 (SLQ); rise@0.5 and curv (d^T H d): filter-normalised directions",
             "  " + " ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(COLUMNS, WIDTHS)))]
    for name in result["per_seed"][0]["runs"]:
        for seed, per_seed in zip(result["seeds"], result["per_seed"]):
            lines.append(row(name, seed, per_seed["runs"][name]))
    lines.extend(interval_lines(result))
    lines.extend(verdict(result))
    return lines


SCALARS = ("steps", "lr", "reached", "train_loss", "test_loss", "gap", "train_error",
           "test_error", "mean_eigenvalue", "bulk_mass", "negative_mass", "rise_at_half",
           "curvature")


def record(result):
    """The JSON-able numbers: per run and seed the table's numbers, then the statistics
    (pairs keyed "a - b") and the verdict (end points, slices and spectra dropped)."""
    runs = {name: [{"seed": seed, **{k: s["runs"][name][k] for k in SCALARS},
                    "top_eigenvalues": np.asarray(s["runs"][name]["top_eigenvalues"]).tolist()}
                   for seed, s in zip(result["seeds"], result["per_seed"])]
            for name in result["per_seed"][0]["runs"]}
    stats = {metric: {"runs": s["runs"], "ordering": s["ordering"],
                      "pairs": {f"{a} - {b}": c for (a, b), c in s["pairs"].items()}}
             for metric, s in result["stats"].items()}
    return {"seeds": result["seeds"], "target_loss": result["target_loss"],
            "weight_decay": result["weight_decay"], "num_params": result["num_params"],
            "alpha": ALPHA, "runs": runs, "stats": stats, "verdict": list(verdict(result))}


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
    flags.DEFINE_integer("small_batch", 16, "Batch of small-batch SGD, Adam and AdamW.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("large_batch", 512, "Batch of large-batch SGD.", lower_bound=1, **fv)
    flags.DEFINE_float("sgd_lr", 0.1, "Learning rate of both SGD runs.", lower_bound=0.0, **fv)
    flags.DEFINE_float("adam_lr", 1e-3, "Learning rate of Adam and AdamW.", lower_bound=0.0,
                       **fv)
    flags.DEFINE_float("weight_decay", WEIGHT_DECAY, "AdamW's decoupled weight decay (each "
                       "step shrinks the weights by the factor 1 - adam_lr * weight_decay).",
                       lower_bound=0.0, **fv)
    flags.DEFINE_float("target_loss", 0.1, "Training loss at which every run stops.",
                       lower_bound=0.0, **fv)
    flags.DEFINE_integer("max_steps", 20000, "Step budget per run.", lower_bound=1, **fv)
    flags.DEFINE_integer("check_every", 50, "Steps between checks of the training loss.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("num_lanczos", 60, "Lanczos steps per probe.", lower_bound=5, **fv)
    flags.DEFINE_integer("num_probes", 4, "SLQ probe vectors.", lower_bound=1, **fv)
    flags.DEFINE_integer("resolution", 21, "Points per axis of the slices in [-1, 1].",
                         lower_bound=3, **fv)
    flags.DEFINE_integer("seeds", 5, "Number of seeds (0, 1, ...): task, init and batches; "
                         "intervals and paired tests need at least 2.", lower_bound=2, **fv)
    flags.register_multi_flags_validator(
        ["small_batch", "large_batch"], lambda f: f["small_batch"] < f["large_batch"],
        message="--small_batch must be smaller than --large_batch", **fv)
    _common.define_output_flags(flag_values)


def demo(flag_values):
    """Runs the demo with parsed `flag_values`, prints its report, saves the figure and
    <outdir>/landscape.json, and returns the result."""
    f = flag_values
    start = time.perf_counter()
    result = run(tuple(range(f.seeds)), f.classes, f.width, f.depth, f.small_batch,
                 f.large_batch, f.sgd_lr, f.adam_lr, f.target_loss, f.weight_decay,
                 train_examples=f.train_examples, test_examples=f.test_examples,
                 input_dim=f.input_dim, label_noise=f.label_noise, max_steps=f.max_steps,
                 check_every=f.check_every, num_lanczos=f.num_lanczos,
                 num_probes=f.num_probes, resolution=f.resolution)
    for line in report(result):
        print(line)
    print("saved", plot(result, f.outdir, f.dpi))
    print("saved", _common.write_results("landscape", record(result), f.outdir))
    print(f"total {time.perf_counter() - start:.0f} s")
    return result


def main(argv):
    del argv
    demo(flags.FLAGS)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
