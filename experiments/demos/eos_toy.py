"""Edge of stability on a two-parameter toy: L(x, y) = (1 - x^2 y^2)^2.

The minima form the hyperbola xy = 1, where the Hessian is 8 (y, x)(y, x)^T: the sharpness
(top Hessian eigenvalue) there is S = 8 (x^2 + y^2), smallest (16) at x = y = 1 and growing
with the imbalance x^2 - y^2, which gradient flow conserves (with u = xy, d/dt x^2 =
d/dt y^2 = 8 u^2 (1 - u^2)). So gradient flow from (x0, y0) ends where S = 8 (x^2 + y^2) =
8 sqrt(c^2 + 4), c = x0^2 - y0^2.

  * GD at a constant step eta cannot settle where S > 2/eta (the top direction is then
    unstable). Started where gradient flow would end sharper than 2/eta, the sharpness rises
    past 2/eta (progressive sharpening), GD oscillates across the valley, and the sharpness
    falls back to just below 2/eta, where GD converges: the edge of stability in miniature
    (Cohen et al. 2021, arXiv 2103.00065; this toy: Zhu et al. 2022, arXiv 2210.03294, who
    prove GD ends at sharpness ~2/eta on it).
  * The seed's "let's try eta_t = 1 / lambda_max(theta_t)": the step then matches the current
    curvature, S_t eta_t = 1 by construction, and GD converges in a handful of steps to a
    minimum near gradient flow's, sharper than 2/eta for the constant eta above. (Far from
    the valley the most curved direction is a negative one, so the demo uses
    eta_t = 1 / max_i |lambda_i|, the spectral norm; it equals 1/lambda_max wherever the top
    eigenvalue dominates, which includes every minimum.)
  * Self-stabilization (Damian, Nichani & Lee 2022, arXiv 2209.15594): at a point theta with
    top eigenpair (S, u), the gradient after a displacement alpha u is, to second order,
    grad L(theta) + alpha S u + (alpha^2 / 2) grad S(theta), because the third derivative
    contracted twice with u is the gradient of the eigenvalue, D^3L[u, u] = grad S. One GD step
    from theta + alpha u therefore lands eta (alpha^2 / 2) grad S away from where the
    quadratic model of L at theta sends it, and so (to first order in that displacement)

        S(step on L) - S(step on the quadratic model) = -eta (alpha^2 / 2) |grad S|^2 < 0:

    oscillating along u pushes GD down the sharpness gradient. The demo measures the
    left side at the minimum with S = 2/eta for shrinking alpha (grad S by jax.grad of the
    top eigenvalue of the 2x2 jax.hessian) and reports measured / predicted, which tends to
    1 with an O(alpha) error.

Everything runs in float64 (the toy is 2-D).

  python -m ravine.experiments.demos.eos_toy --lr=0.05,0.01 --x0=2.5 --y0=0.1 --steps=1000
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from ravine.experiments.demos import _common
from ravine.experiments.runtime import cli

CONVERGED = 1e-10  # loss at which a run counts as converged


def loss(theta):
    """L(x, y) = (1 - x^2 y^2)^2."""
    x, y = theta[0], theta[1]
    return (1.0 - x**2 * y**2) ** 2


def hessian_eigh(theta):
    """Eigenvalues (ascending) and eigenvectors (columns) of the 2x2 Hessian at theta."""
    return jnp.linalg.eigh(jax.hessian(loss)(theta))


def sharpness(theta):
    """S(theta), the top eigenvalue of the Hessian."""
    return jnp.linalg.eigvalsh(jax.hessian(loss)(theta))[-1]


def gradient_flow_sharpness(x0, y0):
    """Sharpness where gradient flow from (x0, y0) (x0 y0 > 0) ends: 8 sqrt(c^2 + 4)."""
    return 8.0 * math.sqrt((x0**2 - y0**2) ** 2 + 4.0)


def edge_point(lr):
    """The minimum (x >= y > 0, xy = 1) with sharpness exactly 2/lr (needs lr <= 1/8)."""
    s = 1.0 / (4.0 * lr)  # x^2 + y^2 there
    if s < 2.0:
        raise ValueError(f"lr must be at most 1/8 for a minimum with sharpness 2/lr, got {lr}")
    x = math.sqrt((s + math.sqrt(s * s - 4.0)) / 2.0)
    return np.array([x, 1.0 / x])


def gradient_descent(theta0, steps, lr=None):
    """GD from theta0: a constant `lr`, or eta_t = 1 / max|eig(H(theta_t))| when lr is None.

    Returns numpy arrays over t = 0..steps: `theta` [steps+1, 2], `loss`, `sharpness`,
    `spectral_norm` and `lr` (the step taken from theta_t; the last entry is the one that
    would come next).
    """
    with jax.enable_x64(True):
        def measure(theta):
            eigenvalues, _ = hessian_eigh(theta)
            norm = jnp.max(jnp.abs(eigenvalues))
            eta = 1.0 / norm if lr is None else jnp.float64(lr)
            return loss(theta), eigenvalues[-1], norm, eta

        def step(theta, _):
            value, top, norm, eta = measure(theta)
            return theta - eta * jax.grad(loss)(theta), (theta, value, top, norm, eta)

        @jax.jit
        def trajectory(theta0):
            last, history = jax.lax.scan(step, theta0, length=steps)
            final = (last, *measure(last))
            return jax.tree.map(lambda h, f: jnp.concatenate([h, f[None]]), history, final)

        theta, values, top, norm, eta = trajectory(jnp.asarray(theta0, jnp.float64))
        return {"theta": np.asarray(theta), "loss": np.asarray(values),
                "sharpness": np.asarray(top), "spectral_norm": np.asarray(norm),
                "lr": np.asarray(eta)}


def summarize(run, lr=None):
    """The numbers the demo prints for one trajectory."""
    converged = np.flatnonzero(run["loss"] <= CONVERGED)
    out = {"final_theta": run["theta"][-1].tolist(), "final_loss": float(run["loss"][-1]),
           "initial_sharpness": float(run["sharpness"][0]),
           "max_sharpness": float(run["sharpness"].max()),
           "final_sharpness": float(run["sharpness"][-1]),
           "steps_to_converge": int(converged[0]) if converged.size else None}
    if lr is not None:
        out["final_sharpness_over_2_over_lr"] = float(run["sharpness"][-1] * lr / 2)
    else:
        top_dominates = run["sharpness"] >= run["spectral_norm"] * (1 - 1e-12)
        out["max_deviation_sharpness_times_lr"] = float(np.max(np.abs(
            run["sharpness"][top_dominates] * run["lr"][top_dominates] - 1.0)))
        out["steps_where_top_dominates"] = int(top_dominates.sum())
    return out


def self_stabilization(lr, alphas=(0.1, 0.03, 0.01, 0.003, 0.001), theta=None):
    """Measured vs predicted sharpness drop of one GD step after a displacement alpha u.

    At `theta` (default: the minimum with sharpness 2/lr), with top eigenpair (S, u) of H:
      theta_gd    = theta + alpha u - lr grad L(theta + alpha u)            (GD on L),
      theta_model = theta + alpha u - lr (grad L(theta) + alpha H u)        (GD on the
                    quadratic model of L at theta),
      measured    = S(theta_gd) - S(theta_model),   predicted = -lr alpha^2/2 |grad S|^2.
    Also checks grad S = D^3 L(theta)[u, u] (third derivative by forward-over-Hessian).
    """
    with jax.enable_x64(True):
        theta = jnp.asarray(edge_point(lr) if theta is None else theta, jnp.float64)

        @jax.jit
        def local(theta):
            eigenvalues, vectors = hessian_eigh(theta)
            u = vectors[:, -1]
            grad_s = jax.grad(sharpness)(theta)
            third = jnp.einsum("ijk,j,k->i", jax.jacfwd(jax.hessian(loss))(theta), u, u)
            return eigenvalues[-1], u, grad_s, jnp.max(jnp.abs(grad_s - third))

        @jax.jit
        def perturbed_step(theta, u, grad_s, alpha):
            start = theta + alpha * u
            theta_gd = start - lr * jax.grad(loss)(start)
            theta_model = start - lr * (jax.grad(loss)(theta)
                                          + alpha * jax.hessian(loss)(theta) @ u)
            measured = sharpness(theta_gd) - sharpness(theta_model)
            predicted = -lr * alpha**2 / 2 * grad_s @ grad_s
            miss = (theta_gd - theta_model) - (-lr * alpha**2 / 2 * grad_s)
            return measured, predicted, jnp.linalg.norm(miss) / jnp.linalg.norm(
                lr * alpha**2 / 2 * grad_s)

        top, u, grad_s, third_gap = local(theta)
        rows = []
        for alpha in alphas:
            measured, predicted, miss = (float(v) for v in perturbed_step(
                theta, u, grad_s, jnp.float64(alpha)))
            rows.append({"alpha": alpha, "measured": measured, "predicted": predicted,
                         "ratio": measured / predicted, "displacement_error": miss})
        return {"theta": np.asarray(theta).tolist(), "sharpness": float(top),
                "grad_sharpness": np.asarray(grad_s).tolist(),
                "grad_sharpness_vs_third_derivative": float(third_gap), "rows": rows}


def run(lrs=(0.05, 0.01), x0=2.5, y0=0.1, steps=1000, alphas=(0.1, 0.03, 0.01, 0.003, 0.001),
        stabilization_lr=None):
    """GD at each constant lr and with eta_t = 1/lambda_max, and the self-stabilization table
    at the minimum with sharpness 2/stabilization_lr (default: the largest lr)."""
    theta0 = np.array([x0, y0])
    constant = {}
    for lr in lrs:
        trajectory = gradient_descent(theta0, steps, lr)
        constant[lr] = {"trajectory": trajectory, **summarize(trajectory, lr)}
    adaptive = gradient_descent(theta0, steps, None)
    stabilization_lr = max(lrs) if stabilization_lr is None else stabilization_lr
    return {"x0": x0, "y0": y0, "steps": steps,
            "gradient_flow_sharpness": gradient_flow_sharpness(x0, y0),
            "constant": constant,
            "adaptive": {"trajectory": adaptive, **summarize(adaptive)},
            "stabilization_lr": stabilization_lr,
            "self_stabilization": self_stabilization(stabilization_lr, alphas)}


def plot(result, outdir, dpi=100):
    fig, axes = _common.plt.subplots(1, 4, figsize=(19, 4))
    ax_path, ax_sharp, ax_loss, ax_stab = axes
    xs = np.linspace(0.3, 3.2, 200)
    ax_path.plot(xs, 1 / xs, "k:", lw=1, label="minima xy = 1")
    runs = [(f"eta={lr:g}", r) for lr, r in result["constant"].items()]
    runs.append(("eta_t = 1/lambda_max", result["adaptive"]))
    for (label, r), color in zip(runs, ("C0", "C1", "C2", "C3", "C4")):
        trajectory = r["trajectory"]
        steps = np.arange(trajectory["loss"].size)
        ax_path.plot(*trajectory["theta"].T, ".-", ms=2, lw=0.5, color=color, label=label)
        ax_sharp.plot(steps, trajectory["sharpness"], color=color, label=label)
        ax_loss.semilogy(steps, np.maximum(trajectory["loss"], 1e-32), color=color, label=label)
    for lr, color in zip(result["constant"], ("C0", "C1", "C2")):
        ax_sharp.axhline(2 / lr, color=color, ls="--", lw=1)
    ax_sharp.axhline(result["gradient_flow_sharpness"], color="gray", ls=":", lw=1,
                     label="gradient flow's end")
    ax_path.set(xlabel="x", ylabel="y", xlim=(0, 3.2), ylim=(0, 2),
                title=f"GD from ({result['x0']:g}, {result['y0']:g})")
    ax_sharp.set(xlabel="step", ylabel="sharpness lambda_max", yscale="log", ylim=(1, None),
                 title="Sharpness vs 2/eta (dashed)")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    stab = result["self_stabilization"]["rows"]
    alphas = [row["alpha"] for row in stab]
    ax_stab.loglog(alphas, [-row["measured"] for row in stab], "o-", label="measured drop")
    ax_stab.loglog(alphas, [-row["predicted"] for row in stab], "k--",
                   label="eta alpha^2/2 |grad S|^2")
    ax_stab.set(xlabel="perturbation alpha along u", ylabel="sharpness drop after one step",
                title=f"Self-stabilization at S = 2/{result['stabilization_lr']:g}")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _common.save_figure(fig, outdir, "eos_toy", dpi)


def record(result):
    """The JSON-able numbers (trajectories dropped)."""
    def strip(r):
        return {k: v for k, v in r.items() if k != "trajectory"}

    return {"x0": result["x0"], "y0": result["y0"], "steps": result["steps"],
            "gradient_flow_sharpness": result["gradient_flow_sharpness"],
            "constant": {str(lr): strip(r) for lr, r in result["constant"].items()},
            "adaptive": strip(result["adaptive"]),
            "stabilization_lr": result["stabilization_lr"],
            "self_stabilization": result["self_stabilization"]}


def write_results(result, outdir):
    return _common.write_results("eos_toy", record(result), outdir)


def main(argv):
    del argv
    lrs = _common.numbers(FLAGS.lr)
    alphas = _common.numbers(FLAGS.alphas)
    with cli.usage_errors():
        if FLAGS.x0 * FLAGS.y0 <= 0:
            raise ValueError(f"--x0 and --y0 must be nonzero with the same sign, got "
                             f"{FLAGS.x0}, {FLAGS.y0}")
        edge_point(max(lrs))  # the self-stabilization point must exist
    result = run(lrs, FLAGS.x0, FLAGS.y0, FLAGS.steps, alphas)
    print(f"L(x, y) = (1 - x^2 y^2)^2 from ({FLAGS.x0:g}, {FLAGS.y0:g}), {FLAGS.steps} steps; "
          f"gradient flow would end at sharpness {result['gradient_flow_sharpness']:.2f}")
    for lr, r in result["constant"].items():
        print(f"  constant eta={lr:g} (2/eta={2 / lr:g}): sharpness {r['initial_sharpness']:.3g}"
              f" -> max {r['max_sharpness']:.3g} -> final {r['final_sharpness']:.4g} "
              f"(final sharpness*eta/2 = {r['final_sharpness_over_2_over_lr']:.4f}); "
              f"loss {r['final_loss']:.2e}, loss <= {CONVERGED:g} at step "
              f"{r['steps_to_converge']}")
    a = result["adaptive"]
    print(f"  eta_t = 1/lambda_max: final sharpness {a['final_sharpness']:.4g}, max "
          f"|sharpness*eta_t - 1| = {a['max_deviation_sharpness_times_lr']:.1e} over the "
          f"{a['steps_where_top_dominates']} steps where lambda_max is the largest |eigenvalue|; "
          f"loss {a['final_loss']:.2e}, loss <= {CONVERGED:g} at step {a['steps_to_converge']}")
    stab = result["self_stabilization"]
    print(f"self-stabilization at the minimum ({stab['theta'][0]:.4f}, {stab['theta'][1]:.4f}) "
          f"with sharpness {stab['sharpness']:.4g} = 2/{result['stabilization_lr']:g}; "
          f"|grad S| = {math.hypot(*stab['grad_sharpness']):.4g} "
          f"(grad S - D^3L[u,u]: {stab['grad_sharpness_vs_third_derivative']:.1e})")
    print("  " + "alpha".rjust(8) + "measured dS".rjust(14) + "predicted".rjust(14)
          + "ratio".rjust(9) + "  (dS = S(GD step) - S(step on the quadratic model))")
    for row in stab["rows"]:
        print(f"  {row['alpha']:8.3g}{row['measured']:14.4e}{row['predicted']:14.4e}"
              f"{row['ratio']:9.4f}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))
    print("saved", write_results(result, FLAGS.outdir))


if __name__ == "__main__":
    _common.define_number_list("lr", ["0.05", "0.01"], "Constant step sizes, one run each "
                               "(the largest sets the self-stabilization point; at most 1/8).",
                               check=lambda lr: 0 < lr <= 0.125, requirement="numbers in "
                               "(0, 0.125]")
    flags.DEFINE_float("x0", 2.5, "Initial x.")
    flags.DEFINE_float("y0", 0.1, "Initial y.")
    flags.DEFINE_integer("steps", 1000, "GD steps per run.", lower_bound=1)
    _common.define_number_list("alphas", ["0.1", "0.03", "0.01", "0.003", "0.001"],
                               "Perturbations along the top eigenvector.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
