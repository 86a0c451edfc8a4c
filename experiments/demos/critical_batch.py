"""Steps to a target loss vs batch size, and the gradient noise scale that marks the knee.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): with the learning
rate tuned for each batch size B, the steps S to reach a given loss follow
    S(B) ~ S_min * (1 + B_crit / B):
doubling a small batch halves the steps (perfect scaling), while past the critical batch
size B_crit extra examples per step buy almost nothing. The simple gradient noise scale
B_simple = tr(Sigma) / |G|^2 (per-example gradient covariance over the squared true
gradient), measured from one batch of per-example gradients, estimates B_crit; the paper
finds agreement within an order of magnitude. It overestimates when the Hessian is
anisotropic: the stable learning rate is capped by the sharpest direction (here B_crit is
closer to B_stable = tr(H Sigma) / (2 lambda_max |G|^2), a few times below B_simple).

Task: streaming linear regression y = w*.x + sigma * noise with x ~ N(0, diag(h)),
eigenvalues h spread over [--min_curvature, 1]. The excess loss e^T H e / 2 (e = w - w*)
is computed exactly after every step. For each batch size, `optim.sgd` (learning rate via
`optax.inject_hyperparams`, so one compiled program sweeps the grid) runs --runs seeds at
every learning rate of the grid; S(B) is the fewest steps at which the mean excess loss
over seeds reaches --target_fraction of its starting value. B_simple is measured with
`optim.diagnostics.gradient_noise_scale` (32 batches of 4096 per-example gradients) at the
point where full-batch GD reaches the target and checked against its closed form
(Gaussian x: tr Sigma = |He|^2 + (e^T H e + sigma^2) tr H).

  python -m ravine.experiments.demos.critical_batch --batch_sizes=1,2,4,8,16,32,64,128,256,512,1024
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common
from ravine.optim import diagnostics

DEFAULT_BATCH_SIZES = [str(2**k) for k in range(13)]


class Problem(NamedTuple):
    """Linear regression with x ~ N(0, diag(h)), y = w*.x + sigma * noise; SGD starts at 0."""
    h: jax.Array  # eigenvalues of the Hessian E[x x^T]
    w_star: jax.Array
    sigma: float

    @classmethod
    def create(cls, dim=16, min_curvature=0.2, sigma=0.5, seed=0):
        """h spread geometrically over [min_curvature, 1] and a random unit-norm w*."""
        w_star = jax.random.normal(_common.prng_key(seed), (dim,))
        return cls(jnp.asarray(np.geomspace(1.0, min_curvature, dim), jnp.float32),
                   w_star / jnp.linalg.norm(w_star), sigma)

    @property
    def w0(self):
        return jnp.zeros_like(self.w_star)

    def excess_loss(self, w):
        """E[(w.x - y)^2 / 2] - sigma^2 / 2 = e^T H e / 2."""
        e = w - self.w_star
        return 0.5 * jnp.sum(self.h * e**2, axis=-1)

    def sample(self, key, batch_size):
        x_key, noise_key = jax.random.split(key)
        x = jax.random.normal(x_key, (batch_size, self.h.size)) * jnp.sqrt(self.h)
        return x, x @ self.w_star + self.sigma * jax.random.normal(noise_key, (batch_size,))

    def per_example_grads(self, w, x, y):
        """Gradients of (w.x - y)^2 / 2, one row per example."""
        return (x @ w - y)[:, None] * x

    def noise_scales(self, w):
        """Closed-form noise scales at w for Gaussian x.

        Returns B_simple = tr(Sigma) / |G|^2, B_noise = tr(H Sigma) / G^T H G and
        B_stable = tr(H Sigma) / (2 lambda_max |G|^2), the batch at which the gradient noise
        costs as much as the signal gains for SGD at lr ~ 1 / lambda_max.
        """
        e = w - self.w_star
        g = self.h * e  # the true gradient H e
        spread = self.excess_loss(w) * 2 + self.sigma**2
        # Sigma = H e e^T H + (e^T H e + sigma^2) H for Gaussian x.
        trace_sigma = jnp.sum(g**2) + spread * jnp.sum(self.h)
        trace_h_sigma = jnp.sum(self.h * g**2) + spread * jnp.sum(self.h**2)
        return (float(trace_sigma / jnp.sum(g**2)), float(trace_h_sigma / jnp.sum(self.h * g**2)),
                float(trace_h_sigma / (2 * jnp.max(self.h) * jnp.sum(g**2))))


def loss_curves(problem, batch_size, lrs, runs, steps, seed=0):
    """Mean over `runs` seeds of the excess loss after each of `steps` SGD steps, per lr.

    Every learning rate of a run sees the same batches (common random numbers), so the
    comparison between learning rates is not blurred by sampling noise.
    """
    tx = optax.inject_hyperparams(optim.sgd)(learning_rate=0.0)
    def init(lr):
        state = tx.init(problem.w0)
        return state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})

    update = jax.vmap(tx.update)

    def one_run(key):
        def step(carry, t):
            w, state = carry  # one row per learning rate
            x, y = problem.sample(jax.random.fold_in(key, t), batch_size)
            grads = (w @ x.T - y) @ x / batch_size  # mean per-example gradient, per lr
            updates, state = update(grads, state, w)
            w = w + updates
            return (w, state), problem.excess_loss(w)

        w0 = jnp.broadcast_to(problem.w0, (len(lrs), problem.w0.size))
        _, losses = jax.lax.scan(step, (w0, jax.vmap(init)(jnp.asarray(lrs, jnp.float32))),
                                 jnp.arange(steps))
        return losses  # [steps, lrs]

    keys = jax.random.split(_common.prng_key(seed), runs)
    return np.asarray(jax.jit(jax.vmap(one_run))(keys).mean(axis=0).T)


def fit_critical_batch(batch_sizes, steps):
    """S_min and B_crit of S(B) = S_min (1 + B_crit / B), least squares in relative error."""
    b, s = np.asarray(batch_sizes, float), np.asarray(steps, float)
    # Rows (a + c / B) / S = 1 with a = S_min and c = S_min * B_crit.
    (a, c), *_ = np.linalg.lstsq(np.stack([1 / s, 1 / (b * s)], axis=1), np.ones_like(s),
                                 rcond=None)
    return float(a), float(c / a)


def gd_point_at_target(problem, target, lr=1.0, max_steps=100_000):
    """Full-batch GD (exact gradient H e) from w_0 until the excess loss is <= target."""
    w = problem.w0
    for _ in range(max_steps):
        if problem.excess_loss(w) <= target:
            return w
        w = w - lr * problem.h * (w - problem.w_star)
    raise ValueError(f"full-batch GD did not reach the target loss {target}")


def measured_noise_scale(problem, w, batches, batch_size, seed=0):
    """B_simple at w from `batches` batches of per-example gradients (optim.diagnostics).

    As McCandlish et al. advise, tr(Sigma) and |G|^2 are averaged over the batches before
    taking their ratio: one batch's ratio is noisy (here +-30% at 4096 examples).
    """
    keys = jax.random.split(_common.prng_key(seed + 1), batches)
    estimates = jax.jit(jax.vmap(lambda key: diagnostics.gradient_noise_scale(
        problem.per_example_grads(w, *problem.sample(key, batch_size)))))(keys)
    return float(jnp.mean(estimates.trace_covariance) / jnp.mean(estimates.grad_norm_sq))


def run(batch_sizes=tuple(2**k for k in range(13)), dim=16, min_curvature=0.2, sigma=0.5,
        target_fraction=0.02, lrs=tuple(np.geomspace(0.004, 1.9, 16)), runs=16,
        max_steps=5000, noise_batches=32, noise_batch_size=4096, seed=0):
    """Steps to target per batch size, the fitted S_min / B_crit and the noise scales."""
    problem = Problem.create(dim, min_curvature, sigma, seed)
    target = target_fraction * float(problem.excess_loss(problem.w0))
    steps, best_lrs, budget = [], [], max_steps
    for batch_size in sorted(batch_sizes):
        # With the lr tuned, a bigger batch never needs more steps: cap the scan there.
        # Curves start after the first step: index i is step i + 1.
        hits = 1 + _common.first_index_at_or_below(
            loss_curves(problem, batch_size, lrs, runs, budget, seed), target)
        best = int(np.argmin(hits))
        if not np.isfinite(hits[best]):
            raise ValueError(f"batch size {batch_size} did not reach the target within "
                             f"{budget} steps at any learning rate; raise --max_steps")
        steps.append(int(hits[best]))
        best_lrs.append(float(lrs[best]))
        budget = steps[-1]
    s_min, b_crit = fit_critical_batch(sorted(batch_sizes), steps)

    w_target = gd_point_at_target(problem, target)
    b_simple_measured = measured_noise_scale(problem, w_target, noise_batches, noise_batch_size,
                                             seed)
    b_simple, b_noise, b_stable = problem.noise_scales(w_target)
    return {"batch_sizes": sorted(batch_sizes), "steps": steps, "best_lrs": best_lrs,
            "target": target, "s_min": s_min, "b_crit": b_crit,
            "b_simple_measured": b_simple_measured, "b_simple": b_simple,
            "b_noise": b_noise, "b_stable": b_stable}


def plot(result, outdir, dpi=100):
    fig, ax = _common.plt.subplots(figsize=(5.8, 4.2))
    b = np.asarray(result["batch_sizes"], float)
    ax.loglog(b, result["steps"], "o-", label="measured (best lr per batch)")
    ax.loglog(b, result["s_min"] * (1 + result["b_crit"] / b), "k--",
              label=f"fit S_min(1 + B_crit/B): B_crit={result['b_crit']:.0f}")
    ax.axvline(result["b_simple_measured"], color="tab:red", ls=":",
               label=f"B_simple (optim.diagnostics) = {result['b_simple_measured']:.0f}")
    ax.axvline(result["b_stable"], color="tab:green", ls=":",
               label=f"tr(H Sigma)/(2 lambda_max |G|^2) = {result['b_stable']:.0f}")
    ax.set(xlabel="batch size B", ylabel="steps to target loss",
           title="Critical batch size: steps vs batch size")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _common.save_figure(fig, outdir, "critical_batch", dpi)


def main(argv):
    del argv
    with cli.usage_errors():
        result = run(_common.numbers(FLAGS.batch_sizes, int), FLAGS.dim, FLAGS.min_curvature,
                     FLAGS.sigma, FLAGS.target_fraction, runs=FLAGS.runs,
                     max_steps=FLAGS.max_steps, seed=FLAGS.seed)
    print(f"target excess loss {result['target']:.4g} ({FLAGS.target_fraction:g} of the start)")
    print(f"  {'batch':>6}{'steps':>8}{'best lr':>10}{'examples':>10}")
    for b, s, lr in zip(result["batch_sizes"], result["steps"], result["best_lrs"]):
        print(f"  {b:>6d}{s:>8d}{lr:>10.3g}{b * s:>10d}")
    print(f"fit S(B) = S_min (1 + B_crit / B): S_min={result['s_min']:.1f}, "
          f"B_crit={result['b_crit']:.1f}")
    print(f"gradient noise scale at the target: B_simple measured={result['b_simple_measured']:.1f}"
          f" (closed form {result['b_simple']:.1f}), B_noise={result['b_noise']:.1f}, "
          f"tr(H Sigma)/(2 lambda_max |G|^2)={result['b_stable']:.1f}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    _common.define_number_list("batch_sizes", DEFAULT_BATCH_SIZES, "Batch sizes to time.",
                               parse=int, check=lambda b: b >= 1,
                               requirement="positive integers")
    flags.DEFINE_integer("dim", 16, "Dimension of the regression.", lower_bound=1)
    flags.DEFINE_float("min_curvature", 0.2, "Smallest eigenvalue of E[x x^T] (largest 1).",
                       lower_bound=1e-6, upper_bound=1.0)
    flags.DEFINE_float("sigma", 0.5, "Label noise standard deviation.", lower_bound=0.0)
    flags.DEFINE_float("target_fraction", 0.02, "Target excess loss / starting excess loss.",
                       lower_bound=1e-6, upper_bound=1.0)
    flags.DEFINE_integer("runs", 16, "Seeds averaged per learning rate.", lower_bound=1)
    flags.DEFINE_integer("max_steps", 5000, "Step budget at the smallest batch.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
