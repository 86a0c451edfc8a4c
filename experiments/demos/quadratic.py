"""Gradient descent vs heavy ball vs Nesterov on ill-conditioned quadratics.

On f(x) = x^T A x / 2 with eigenvalues of A in [mu, L] and condition number kappa = L/mu:
  * GD at its best constant step alpha* = 2/(L + mu) contracts the error by exactly
    (kappa - 1)/(kappa + 1) per step (the extreme eigen-directions both have
    |1 - alpha* lambda| = that factor), so it needs ~ kappa/2 * log(1/eps) steps;
  * heavy ball (Polyak 1964) at alpha = 4/(sqrt(L) + sqrt(mu))^2,
    beta = ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^2 contracts by (sqrt(kappa) - 1)/(sqrt(kappa) + 1);
  * Nesterov (1983) at alpha = 1/L, beta = (sqrt(kappa) - 1)/(sqrt(kappa) + 1) contracts by
    ~1 - 1/sqrt(kappa).
So iterations to eps grow like kappa for GD and like sqrt(kappa) with momentum: log-log
slopes ~1 and ~0.5. All three run through `optim.sgd`. (Nesterov, "Introductory Lectures on
Convex Optimization", 2004, sections 2.1-2.2.)

  python -m ravine.experiments.demos.quadratic --kappas=10,100,1000,10000 --eps=1e-6
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common

METHODS = ("gd", "heavy_ball", "nesterov")


def eigenvalues(kappa, dim):
    """`dim` eigenvalues spaced geometrically from 1 to `kappa` (both ends included)."""
    return jnp.asarray(np.geomspace(1.0, kappa, dim), jnp.float32)


def tuned_optimizer(method, mu, big_l):
    """`optim.sgd` with the textbook-optimal step size and momentum for eigenvalues in [mu, L]."""
    sqrt_kappa = math.sqrt(big_l / mu)
    if method == "gd":
        return optim.sgd(2.0 / (big_l + mu))
    if method == "heavy_ball":
        momentum = ((sqrt_kappa - 1) / (sqrt_kappa + 1)) ** 2
        return optim.sgd(4.0 / (math.sqrt(big_l) + math.sqrt(mu)) ** 2, momentum=momentum)
    if method == "nesterov":
        momentum = (sqrt_kappa - 1) / (sqrt_kappa + 1)
        return optim.sgd(1.0 / big_l, momentum=momentum, nesterov=True)
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


def theoretical_rate(method, kappa):
    """Asymptotic per-step error contraction of `method` at its tuned hyperparameters."""
    if method == "gd":
        return (kappa - 1) / (kappa + 1)
    if method == "heavy_ball":
        return (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    return 1 - 1 / math.sqrt(kappa)


def error_norms(tx, lam, steps):
    """||x_t|| for t = 0..steps when `tx` minimizes sum(lam * x^2)/2 from x_0 = 1."""

    def step(carry, _):
        x, state = carry
        updates, state = tx.update(lam * x, state, x)
        x = x + updates
        return (x, state), jnp.linalg.norm(x)

    x0 = jnp.ones_like(lam)
    _, norms = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
    return np.concatenate([[float(jnp.linalg.norm(x0))], np.asarray(norms)])


def measured_gd_rate(kappa, dim=16, reduction=1e-6):
    """GD's per-step contraction over the second half of a run shrinking the error by `reduction`.

    The first half lets the fast eigen-directions die out, so the ratio is the asymptotic rate.
    """
    steps = 2 * math.ceil(math.log(reduction) / math.log(theoretical_rate("gd", kappa)))
    norms = error_norms(tuned_optimizer("gd", 1.0, kappa), eigenvalues(kappa, dim), steps)
    half = steps // 2
    return float((norms[-1] / norms[half]) ** (1.0 / (steps - half)))


def iterations_to_eps(method, kappa, eps=1e-6, dim=16, max_steps=10**6):
    """First t with ||x_t|| <= eps ||x_0|| for `method` tuned for condition number `kappa`."""
    lam = eigenvalues(kappa, dim)
    tx = tuned_optimizer(method, 1.0, kappa)
    x0 = jnp.ones_like(lam)
    target = eps * jnp.linalg.norm(x0)

    def not_done(carry):
        t, x, _ = carry
        return (jnp.linalg.norm(x) > target) & (t < max_steps)

    def step(carry):
        t, x, state = carry
        updates, state = tx.update(lam * x, state, x)
        return t + 1, x + updates, state

    t, _, _ = jax.lax.while_loop(not_done, step, (0, x0, tx.init(x0)))
    return int(t)


def run(kappas=(10, 100, 1000, 10000), eps=1e-6, dim=16):
    """GD rates and iterations to `eps` for each method and kappa, with log-log slopes."""
    rates = {k: (measured_gd_rate(k, dim), theoretical_rate("gd", k)) for k in kappas}
    iterations = {m: [iterations_to_eps(m, k, eps, dim) for k in kappas] for m in METHODS}
    slopes = {m: _common.loglog_slope(kappas, iterations[m]) for m in METHODS}
    # Error curves at the largest kappa, each method run until it reaches eps.
    curves = {m: error_norms(tuned_optimizer(m, 1.0, kappas[-1]), eigenvalues(kappas[-1], dim),
                             iterations[m][-1]) for m in METHODS}
    return {"kappas": list(kappas), "gd_rates": rates, "iterations": iterations,
            "slopes": slopes, "curves": curves}


def plot(result, outdir, dpi=100):
    fig, (ax_curve, ax) = _common.plt.subplots(1, 2, figsize=(10, 3.8))
    for method in METHODS:
        (line,) = ax.loglog(result["kappas"], result["iterations"][method], "o-",
                            label=f"{method} (slope {result['slopes'][method]:.2f})")
        norms = result["curves"][method]
        ax_curve.loglog(np.arange(1, norms.size + 1), norms / norms[0], color=line.get_color(),
                        label=method)
    ax_curve.set(xlabel="iteration t + 1", ylabel="||x_t|| / ||x_0||",
                 title=f"Error at kappa = {result['kappas'][-1]:g}")
    ax_curve.legend()
    ax_curve.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("condition number kappa")
    ax.set_ylabel("iterations to ||x|| <= eps ||x0||")
    ax.set_title("Quadratics: GD ~ kappa, momentum ~ sqrt(kappa)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return _common.save_figure(fig, outdir, "quadratic", dpi)


def main(argv):
    del argv
    kappas = _common.numbers(FLAGS.kappas)
    result = run(kappas, FLAGS.eps, FLAGS.dim)
    print("GD at alpha* = 2/(L+mu): measured rate vs (kappa-1)/(kappa+1)")
    for k, (measured, theory) in result["gd_rates"].items():
        print(f"  kappa={k:>8g}  measured={measured:.6f}  theory={theory:.6f}  "
              f"rel.err={abs(measured - theory) / theory:.2e}")
    print(f"iterations to eps={FLAGS.eps:g}")
    print("  " + "kappa".rjust(10) + "".join(m.rjust(12) for m in METHODS))
    for i, k in enumerate(kappas):
        print(f"  {k:>10g}" + "".join(f"{result['iterations'][m][i]:>12d}" for m in METHODS))
    print("log-log slope of iterations vs kappa: " +
          ", ".join(f"{m}={s:.3f}" for m, s in result["slopes"].items()))
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    # Flags live here so that several demos can be imported in one process (tests).
    _common.define_number_list("kappas", ["10", "100", "1000", "10000"], "Condition numbers.",
                               check=lambda k: k > 1, requirement="numbers > 1")
    flags.DEFINE_float("eps", 1e-6, "Target relative error ||x_t|| / ||x_0||.", lower_bound=1e-30,
                       upper_bound=1.0)
    flags.DEFINE_integer("dim", 16, "Dimension of the quadratic.", lower_bound=2)
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
