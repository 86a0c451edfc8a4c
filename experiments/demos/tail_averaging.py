"""Constant-LR SGD with tail averaging vs 1/t decay vs the final iterate on noisy regression.

Streaming least squares: each step draws x ~ N(0, I_d), y = w*.x + sigma * noise and takes one
SGD step on (w.x - y)^2 / 2 from w_0 = 0. Excess risk E[(w.x - y)^2] - sigma^2 = ||w - w*||^2.
The best any estimator can do from t samples is ~ d sigma^2 / t (ordinary least squares).
  * final iterate, constant lr:   stalls at the stationary noise floor
    lr * d * sigma^2 / (2 - lr * (d + 2))  (exact for Gaussian x; ~ lr * d * sigma^2 / 2);
  * tail average of the same run (mean of w_{t/2+1..t}): falls like d sigma^2 / t, at
    2 / (1 - lr (d + 2) / 2) times the optimum: 2 because it averages half the samples, and
    the rest is the extra gradient noise of SGD on Gaussian x (Jain et al. 2018,
    "Parallelizing Stochastic Gradient Descent for Least Squares Regression"; Polyak &
    Juditsky 1992);
  * 1/t decay, lr_t = min(lr, 1/(mu t)) with mu = 1 the true curvature: also ~ d sigma^2 / t,
    but only because its constant is tuned to mu (too small a constant gives a slower rate).
Expectations are averaged over --runs independent runs sharing samples across methods.

  python -m ravine.experiments.demos.tail_averaging --dim=20 --sigma=0.5 --lr=0.0125
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common

METHODS = ("final_iterate", "tail_average", "decay_1_over_t")


def inverse_time(lr):
    """The 1/t schedule for curvature 1, capped at `lr`: step -> min(lr, 1/(step + 1))."""
    return lambda step: jnp.minimum(lr, 1.0 / (step + 1.0))


def excess_risks(dim=20, sigma=0.5, lr=0.0125, checkpoints=(1024, 2048, 4096, 8192, 16384),
                 runs=100, seed=0):
    """Mean excess risk ||w - w*||^2 at each checkpoint t for each method in METHODS.

    One scan of max(checkpoints) steps per run; the tail average at t is read off prefix sums
    of the constant-lr iterates saved at t/2 and t.
    """
    checkpoints = np.asarray(sorted(checkpoints))
    marks = jnp.asarray(np.concatenate([checkpoints // 2, checkpoints]))  # steps to snapshot
    constant, decayed = optim.sgd(lr), optim.sgd(inverse_time(lr))
    w_star_key, data_key = jax.random.split(_common.prng_key(seed))
    w_star = jax.random.normal(w_star_key, (dim,))
    w_star = w_star / jnp.linalg.norm(w_star)

    def one_run(key):
        def step(carry, t):
            w_c, s_c, w_d, st_c, st_d, snaps = carry
            x_key, noise_key = jax.random.split(jax.random.fold_in(key, t))
            x = jax.random.normal(x_key, (dim,))
            y = x @ w_star + sigma * jax.random.normal(noise_key)
            u_c, st_c = constant.update((x @ w_c - y) * x, st_c, w_c)
            u_d, st_d = decayed.update((x @ w_d - y) * x, st_d, w_d)
            w_c, w_d = w_c + u_c, w_d + u_d
            s_c = s_c + w_c
            # Snapshot (w_const, running sum, w_decay) after update t + 1 where it is a mark.
            now = jnp.stack([w_c, s_c, w_d])
            snaps = jnp.where((t + 1 == marks)[:, None, None], now[None], snaps)
            return (w_c, s_c, w_d, st_c, st_d, snaps), None

        w0 = jnp.zeros(dim)
        snaps = jnp.zeros((marks.size, 3, dim))
        carry = (w0, w0, w0, constant.init(w0), decayed.init(w0), snaps)
        carry, _ = jax.lax.scan(step, carry, jnp.arange(int(checkpoints[-1])))
        return carry[-1]

    snaps = jax.jit(jax.vmap(one_run))(jax.random.split(data_key, runs))
    half, full = snaps[:, :checkpoints.size], snaps[:, checkpoints.size:]
    tail = (full[:, :, 1] - half[:, :, 1]) / jnp.asarray(checkpoints - checkpoints // 2)[:, None]
    estimates = {"final_iterate": full[:, :, 0], "tail_average": tail,
                 "decay_1_over_t": full[:, :, 2]}
    risks = {m: np.asarray(jnp.mean(jnp.sum((w - w_star) ** 2, -1), 0))
             for m, w in estimates.items()}
    return checkpoints, risks


def run(dim=20, sigma=0.5, lr=0.0125, checkpoints=(1024, 2048, 4096, 8192, 16384), runs=100,
        seed=0):
    """Excess risks, their ratio to d sigma^2 / t and their log-log slopes in t."""
    ts, risks = excess_risks(dim, sigma, lr, checkpoints, runs, seed)
    optimum = dim * sigma**2 / ts
    return {"t": ts, "risks": risks, "optimum": optimum,
            "ratios": {m: r / optimum for m, r in risks.items()},
            "slopes": {m: _common.loglog_slope(ts, r) for m, r in risks.items()},
            "noise_floor": lr * dim * sigma**2 / (2 - lr * (dim + 2)),
            "tail_average_ratio": 2 / (1 - lr * (dim + 2) / 2)}


def plot(result, outdir, dpi=100):
    fig, ax = _common.plt.subplots(figsize=(5.5, 4))
    for method in METHODS:
        ax.loglog(result["t"], result["risks"][method], "o-",
                  label=f"{method} (slope {result['slopes'][method]:.2f})")
    ax.loglog(result["t"], result["optimum"], "k--", label="d sigma^2 / t")
    ax.axhline(result["noise_floor"], color="gray", ls=":", label="constant-lr noise floor")
    ax.set_xlabel("samples t")
    ax.set_ylabel("excess risk ||w - w*||^2")
    ax.set_title("Noisy linear regression: SGD variants")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _common.save_figure(fig, outdir, "tail_averaging", dpi)


def main(argv):
    del argv
    checkpoints = _common.numbers(FLAGS.checkpoints, int)
    result = run(FLAGS.dim, FLAGS.sigma, FLAGS.lr, checkpoints, FLAGS.runs, FLAGS.seed)
    print(f"excess risk / (d sigma^2 / t), d={FLAGS.dim}, sigma={FLAGS.sigma}, lr={FLAGS.lr}, "
          f"{FLAGS.runs} runs")
    print("  " + "t".rjust(8) + "".join(m.rjust(16) for m in METHODS))
    for i, t in enumerate(result["t"]):
        print(f"  {t:>8d}" + "".join(f"{result['ratios'][m][i]:>16.3f}" for m in METHODS))
    print("tail average / optimum predicted 2/(1 - lr(d+2)/2) = "
          f"{result['tail_average_ratio']:.3f}")
    print("log-log slope of excess risk vs t: " +
          ", ".join(f"{m}={s:.3f}" for m, s in result["slopes"].items()))
    print(f"constant-lr noise floor lr*d*sigma^2/(2-lr*(d+2)) = {result['noise_floor']:.4g}, "
          f"final iterate at t={result['t'][-1]}: {result['risks']['final_iterate'][-1]:.4g}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    flags.DEFINE_integer("dim", 20, "Dimension d.", lower_bound=1)
    flags.DEFINE_float("sigma", 0.5, "Label noise standard deviation.", lower_bound=0.0)
    flags.DEFINE_float("lr", 0.0125, "Constant learning rate (below 2/(d+2)).",
                       lower_bound=0.0)
    _common.define_number_list("checkpoints", ["1024", "2048", "4096", "8192", "16384"],
                               "Sample counts t at which to measure the excess risk.",
                               parse=int, check=lambda t: t >= 2,
                               requirement="integers >= 2")
    flags.register_multi_flags_validator(
        ["lr", "dim"], lambda f: f["lr"] < 2 / (f["dim"] + 2),
        message="--lr must be below 2/(dim+2), where constant-lr SGD is stable")
    flags.DEFINE_integer("runs", 100, "Independent runs averaged.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
