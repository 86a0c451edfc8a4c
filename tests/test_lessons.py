"""The seeds' lessons of issue 31 as demos (eos_toy, lr_decay, second_order): each claim checked
at a small setting by calling the demo's library functions in-process."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from ravine import models
from ravine.experiments.demos import eos_toy, lr_decay, second_order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = np.array([2.5, 0.1])

# --- eos_toy -------------------------------------------------------------------------------


def test_eos_toy_constant_step_settles_just_below_2_over_eta():
    lr = 0.05
    gradient_flow = eos_toy.gradient_flow_sharpness(*START)
    assert gradient_flow > 1.25 * 2 / lr  # gradient flow would end sharper than the edge
    run = eos_toy.gradient_descent(START, 1000, lr)
    summary = eos_toy.summarize(run, lr)
    # Progressive sharpening overshoots 2/eta, then the sharpness comes back to the edge.
    assert summary["max_sharpness"] > 1.5 * 2 / lr
    assert 0.97 < summary["final_sharpness_over_2_over_lr"] < 1.0  # measured 0.9927
    assert np.all(np.abs(run["sharpness"][500:] * lr / 2 - 1) < 0.03)  # and hovers there
    assert summary["final_loss"] < 1e-10
    # A small step is far from its edge: GD ends where gradient flow does.
    small = eos_toy.summarize(eos_toy.gradient_descent(START, 300, 0.01), 0.01)
    assert small["final_sharpness"] == pytest.approx(gradient_flow, rel=0.01)
    assert small["final_sharpness_over_2_over_lr"] < 0.3


def test_eos_toy_step_one_over_lambda_max_keeps_sharpness_times_step_at_one():
    run = eos_toy.gradient_descent(START, 30, None)
    summary = eos_toy.summarize(run)
    # Wherever lambda_max is the largest |eigenvalue| (from step 1 on here) S_t eta_t = 1.
    assert summary["steps_where_top_dominates"] >= 29
    assert summary["max_deviation_sharpness_times_lr"] < 1e-12
    assert summary["steps_to_converge"] is not None and summary["steps_to_converge"] <= 20
    # It stays near gradient flow's sharp minimum instead of flattening to 2/0.05 = 40.
    assert summary["final_sharpness"] > 40


def test_eos_toy_self_stabilization_matches_first_order_prediction():
    alphas = (0.03, 0.01, 0.003, 0.001)
    stab = eos_toy.self_stabilization(0.05, alphas)
    assert stab["sharpness"] == pytest.approx(40.0, rel=1e-12)
    grad_norm = math.hypot(*stab["grad_sharpness"])
    assert stab["grad_sharpness_vs_third_derivative"] < 1e-9 * grad_norm  # grad S = D^3L[u,u]
    rows = stab["rows"]
    assert all(row["measured"] < 0 for row in rows)  # the step lowers the sharpness
    errors = [abs(row["ratio"] - 1) for row in rows]
    assert errors == sorted(errors, reverse=True)  # better as alpha shrinks
    assert errors[-1] < 0.1  # measured 0.9977 at alpha = 0.001
    # The error is O(alpha): error / alpha stays within a factor 2 across a 30x range.
    per_alpha = [e / a for e, a in zip(errors, alphas)]
    assert max(per_alpha) < 2 * min(per_alpha)


# --- lr_decay ------------------------------------------------------------------------------


def test_eigencurve_is_piecewise_inverse_time_with_doubling_slopes():
    lams = lr_decay.eigenvalues(1000, 100)
    assert lams[0] == pytest.approx(1.0) and lams[-1] == pytest.approx(1e-3)
    assert lr_decay.eigenvalues(100, 100) == pytest.approx(1.0 / np.arange(1, 101))
    total, peak = 10_000, 0.5
    lengths, counts = lr_decay.eigencurve_stages(lams, total)
    assert counts.sum() == 100 and lengths.size == 10  # ceil(log2 1000) octaves
    assert lengths.sum() == pytest.approx(total)
    np.testing.assert_allclose(lengths / lengths[0], np.sqrt(counts / counts[0]))
    inverse = 1.0 / lr_decay.eigencurve(peak, lams, total)
    assert inverse[0] == pytest.approx(1.0 / peak)
    slopes = np.diff(inverse) / lams.min()
    starts = np.concatenate([[0.0], np.cumsum(lengths)])
    for i in range(lengths.size):  # inside stage i, 1/eta_t grows at 2^i mu per step
        inside = np.arange(math.ceil(starts[i]) + 1, math.floor(starts[i + 1]) - 1)
        if inside.size:
            np.testing.assert_allclose(slopes[inside], 2.0**i, rtol=1e-9)
    assert np.all(np.diff(inverse) > 0)  # continuous and decreasing lr


def test_lr_decay_ordering_the_seed_states_at_kappa_1000():
    """A smaller setting than the demo's (d=100, T=1e5, 25 lrs, 4 + 16 problems): d=32,
    T=8000, kappa in {10, 1000}, peak lr over 4 .. 2^-8 (/ tr Sigma, factor 2 apart), tuned
    on 2 problems and reported on 8 fresh ones. Measured here: at kappa=1000 eigencurve 2.13,
    cosine 2.16, WSD 3.07, step 3.40, inverse time 6.29, inverse sqrt 9.03 (x d sigma^2/T);
    log-log slopes in kappa 0.29 / 0.26 (polynomial) against <= 0.10 for the rest. (T=16000,
    twice the time, gave 1.99, 2.13, 3.30, 3.47, 6.30, 9.43 and 0.30 / 0.29 vs <= 0.08; at
    T=8000 every assertion also holds with seed=1 and seed=2. The 8 problems stay: with 4,
    seed=2 breaks the slope ordering.)"""
    horizon = 8_000
    result = lr_decay.run(kappas=(10, 1000), horizons=(horizon,), dim=32,
                          lr_multipliers=tuple(2.0 ** (2 - k) for k in range(11)),
                          end_ratios=(0.1, 0.01), tune_seeds=2, seeds=8)
    at = result["results"][horizon][1000]
    ratio = {name: r["ratio"] for name, r in at.items()}
    for kappa in (10, 1000):
        for name, r in result["results"][horizon][kappa].items():
            assert not r["lr_at_grid_edge"], (kappa, name)
    polynomial = [ratio[n] for n in lr_decay.POLYNOMIAL]
    others = [ratio[n] for n in ratio if n not in lr_decay.POLYNOMIAL]
    assert min(polynomial) > max(others)  # polynomial decay is the worst
    assert ratio["step"] < min(polynomial)  # step decay is better
    claims = lr_decay.claims(result)
    # Eigencurve and cosine the two best final iterates, or within 10% of each other.
    assert claims["eigencurve_and_cosine_best_two"] or claims["cosine_within_10pct_of_eigencurve"]
    assert claims["polynomial_slope_largest"]  # polynomial decay degrades fastest with kappa


# --- second_order --------------------------------------------------------------------------


def test_newton_solves_the_quadratic_in_one_step_and_rosenbrock_in_a_few():
    with jax.enable_x64(True):
        kappa, dim = 1000.0, 50
        f, x_star = second_order.quadratic(dim, kappa)
        quad = second_order.race(f, jnp.zeros(dim), float(f(x_star)), (2 / (1 + kappa),), (),
                                 8000, 2, 1e-10)
        rosen = second_order.race(second_order.rosenbrock, jnp.asarray((-1.5, 2.0)), 0.0,
                                  (1e-3,), (), 2000, 10, 1e-10)
        logistic, path = second_order.logistic_regression()
        convergence = second_order.quadratic_convergence(path[:9], path[-1], logistic)
    assert quad["newton"]["steps"] == 1
    # GD: the gap shrinks by ((kappa-1)/(kappa+1))^2 per step, ~ kappa/4 ln(1e10) = 5756 steps.
    assert 3000 < quad["gd"]["steps"] <= math.ceil(
        math.log(1e-10) / (2 * math.log((kappa - 1) / (kappa + 1)))) + 1
    assert rosen["newton"]["steps"] <= 8  # measured 6
    assert rosen["gd"]["steps"] is None  # GD at its stable lr: not within 2000 steps
    # Quadratic convergence: e_{k+1} / e_k^2 settles on the local constant |H^-1 D^3f[e,e]|/2.
    rows = convergence["rows"]
    assert len(rows) >= 3
    for row in rows:
        assert row["measured"] == pytest.approx(row["predicted"], rel=0.05)
    measured = [row["measured"] for row in rows]
    assert max(measured) < 1.5 * min(measured)


def test_adam_without_moments_or_eps_is_exactly_sign_descent():
    check = second_order.sign_descent_identity(jax.random.key(3), lr=0.1, steps=3)
    assert check["eager_max_deviation"] == 0.0  # IEEE: g / sqrt(g^2) = sign(g) exactly
    # Under jit XLA computes m * rsqrt(v): the same signs, |step| within a few float32 ulp.
    assert check["jit_signs_equal"]
    assert check["jit_max_relative_deviation"] <= 4 * np.finfo(np.float32).eps
    paths = second_order.sign_descent_trajectories(lr=1e-3, steps=300)
    assert paths["max_difference"] == 0.0


def test_block_lanczos_top_eigenvalue_equals_dense_eigvalsh_of_the_block():
    """On a tiny MLP (fast to compile; the masked Lanczos is model-agnostic), each block's
    Hessian formed densely by closing the loss over the other blocks."""
    model = models.MLP(features=(6, 5, 3), activation=jnp.tanh)
    inputs = jax.random.normal(jax.random.key(0), (16, 4))
    targets = jax.random.normal(jax.random.key(1), (16, 3))
    params = nn.unbox(model.init(jax.random.key(2), inputs))

    def loss_fn(p, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((model.apply(p, x) - y) ** 2, axis=-1))

    batch = (inputs, targets)
    flat, unravel = ravel_pytree(params)
    spectrum = jax.jit(lambda s, k: second_order.masked_lanczos(loss_fn, params, batch, s, 12,
                                                                2, k))
    # The loss as a function of one block, the others held fixed, has the Hessian block
    # H[index][:, index] of the whole (83 x 83) Hessian: one compile for every block.
    hessian = np.asarray(jax.jit(jax.hessian(lambda z: loss_fn(unravel(z), batch)))(flat),
                         np.float64)
    checked = 0
    for name, mask in second_order.block_masks(params).items():
        index = np.flatnonzero(mask)
        if index.size < 12:
            continue
        dense = np.linalg.eigvalsh(hessian[np.ix_(index, index)])
        nodes, weights = spectrum(jnp.asarray(mask), jax.random.key(4))
        summary = second_order.spectrum_summary(nodes, weights)
        assert summary["top"] == pytest.approx(dense[-1], rel=1e-3), name
        assert summary["bottom"] >= dense[0] - 1e-4 * abs(dense[-1]), name  # interlacing
        np.testing.assert_allclose(np.asarray(weights).sum(axis=1), 1.0, rtol=1e-5)
        checked += 1
    assert checked >= 3


# --- the scripts ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,flag", [("eos_toy", "--lr=0.2")])
def test_lesson_script_bad_flag_exits_2_with_one_line(name, flag):
    done = subprocess.run([sys.executable, "-m", f"ravine.experiments.demos.{name}", flag],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert flag.split("=")[0] in lines[0]
