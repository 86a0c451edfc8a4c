"""Adam's first steps by hand on loss(theta) = theta^2 / 2, with and without bias correction.

Adam (Kingma & Ba 2015, Algorithm 1), with g_t the gradient at step t = 1, 2, ...:
  m_t = b1 m_{t-1} + (1 - b1) g_t          v_t = b2 v_{t-1} + (1 - b2) g_t^2
  m_hat = m_t / (1 - b1^t)                 v_hat = v_t / (1 - b2^t)
  step  = lr * m_hat / (sqrt(v_hat) + eps) theta_t = theta_{t-1} - step
With bias correction the first step is lr * sign(g) exactly. Without it (m_hat = m, v_hat = v)
the first step is lr * (1 - b1) / sqrt(1 - b2) * sign(g) = 3.16 lr at the defaults: the
zero-initialized second moment underestimates g^2 by a factor 1000 at first.
The bias-corrected table is checked against `optim.adam` run on the same problem.

  python -m ravine.experiments.demos.adam_walkthrough --theta0=2 --lr=0.1 --steps=8
"""
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common

COLUMNS = ("t", "g", "m", "v", "m_hat", "v_hat", "step", "theta")


def walkthrough(theta0=2.0, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, steps=8, bias_correction=True):
    """The table of Adam's quantities (COLUMNS) for `steps` steps on theta^2 / 2, in float64."""
    theta, m, v, rows = theta0, 0.0, 0.0, []
    for t in range(1, steps + 1):
        g = theta  # d/dtheta of theta^2 / 2
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t) if bias_correction else m
        v_hat = v / (1 - b2**t) if bias_correction else v
        step = lr * m_hat / (np.sqrt(v_hat) + eps)
        theta = theta - step
        rows.append(dict(zip(COLUMNS, (t, g, m, v, m_hat, v_hat, step, theta))))
    return rows


def optim_adam_thetas(theta0=2.0, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, steps=8):
    """theta after each of `steps` updates of `optim.adam` on theta^2 / 2 (float32)."""
    tx = optim.adam(lr, b1=b1, b2=b2, eps=eps)
    theta = jnp.asarray(theta0, jnp.float32)
    state, thetas = tx.init(theta), []
    for _ in range(steps):
        updates, state = tx.update(theta, state, theta)
        theta = optax.apply_updates(theta, updates)
        thetas.append(float(theta))
    return np.asarray(thetas)


def run(theta0=2.0, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, steps=8):
    """Both tables plus the largest |theta| difference between the table and `optim.adam`."""
    hparams = dict(theta0=theta0, lr=lr, b1=b1, b2=b2, eps=eps, steps=steps)
    corrected = walkthrough(**hparams)
    uncorrected = walkthrough(**hparams, bias_correction=False)
    thetas = optim_adam_thetas(**hparams)
    deviation = float(np.max(np.abs(thetas - [row["theta"] for row in corrected])))
    return {"theta0": theta0, "corrected": corrected, "uncorrected": uncorrected,
            "optim_adam_thetas": thetas,
            "max_deviation_from_optim_adam": deviation}


def format_table(rows):
    lines = ["".join(c.rjust(12) for c in COLUMNS)]
    for row in rows:
        lines.append(f"{row['t']:>12d}" + "".join(f"{row[c]:>12.6g}" for c in COLUMNS[1:]))
    return "\n".join(lines)


def plot(result, outdir, dpi=100):
    fig, (ax_theta, ax_step) = _common.plt.subplots(1, 2, figsize=(9, 3.5))
    for name, style in (("corrected", "o-"), ("uncorrected", "s--")):
        rows = result[name]
        t = [0] + [row["t"] for row in rows]
        ax_theta.plot(t, [result["theta0"]] + [row["theta"] for row in rows], style, label=name)
        ax_step.plot(t[1:], [row["step"] for row in rows], style, label=name)
    ax_theta.plot(range(1, len(result["optim_adam_thetas"]) + 1), result["optim_adam_thetas"],
                  "kx", label="optim.adam")
    ax_theta.set(xlabel="step t", ylabel="theta", title="theta_t on theta^2/2")
    ax_step.set(xlabel="step t", ylabel="step size",
                title="Step size: lr with bias correction, up to 5 lr without")
    for ax in (ax_theta, ax_step):
        ax.legend()
        ax.grid(True, alpha=0.3)
    return _common.save_figure(fig, outdir, "adam_walkthrough", dpi)


def main(argv):
    del argv
    result = run(FLAGS.theta0, FLAGS.lr, FLAGS.b1, FLAGS.b2, FLAGS.eps, FLAGS.steps)
    print(f"Adam on theta^2/2 from theta0={FLAGS.theta0}, lr={FLAGS.lr}, b1={FLAGS.b1}, "
          f"b2={FLAGS.b2}, eps={FLAGS.eps}")
    print("with bias correction:")
    print(format_table(result["corrected"]))
    print("without bias correction (m_hat = m, v_hat = v):")
    print(format_table(result["uncorrected"]))
    first = result["uncorrected"][0]["step"] / result["corrected"][0]["step"]
    print(f"first step without / with correction: {first:.4f} "
          f"(= (1-b1)/sqrt(1-b2) = {(1 - FLAGS.b1) / np.sqrt(1 - FLAGS.b2):.4f})")
    print(f"max |theta_table - theta_optim.adam| = {result['max_deviation_from_optim_adam']:.2e}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    flags.DEFINE_float("theta0", 2.0, "Starting point.")
    flags.DEFINE_float("lr", 0.1, "Learning rate.", lower_bound=0.0)
    flags.DEFINE_float("b1", 0.9, "First-moment decay.", lower_bound=0.0, upper_bound=0.999999)
    flags.DEFINE_float("b2", 0.999, "Second-moment decay.", lower_bound=0.0,
                       upper_bound=0.999999)
    flags.DEFINE_float("eps", 1e-8, "Denominator epsilon.", lower_bound=0.0)
    flags.DEFINE_integer("steps", 8, "Rows in the table.", lower_bound=1)
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
