"""Diagnostics against closed forms: a quadratic's spectrum, linear regression's noise scale."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from optim import diagnostics

# Largest magnitude 10; the gap 4/10 makes the Rayleigh quotient exact to float32 in 20 steps.
# The negative eigenvalue checks that "top" means largest magnitude and not the last one.
SPECTRUM = np.array([10.0, 4.0, 2.0, 1.0, 0.5, -3.0, 0.1], np.float32)


def quadratic_problem(seed=0):
    """loss(params, A) = 0.5 x^T A x with x = ravel(params) and A = Q diag(SPECTRUM) Q^T."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(SPECTRUM.size, SPECTRUM.size)))
    hessian = jnp.asarray((q * SPECTRUM) @ q.T, jnp.float32)
    params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}  # 7 entries, two leaves

    def loss_fn(params, hessian):
        x = ravel_pytree(params)[0]
        return 0.5 * x @ hessian @ x

    return loss_fn, params, hessian, q[:, 0]


def test_sharpness_finds_the_top_eigenvalue_and_vector_of_a_quadratic():
    loss_fn, params, hessian, top_vector = quadratic_problem()
    eigenvalue, vector = diagnostics.sharpness(loss_fn, params, hessian, iters=20,
                                               return_vector=True)
    np.testing.assert_allclose(eigenvalue, SPECTRUM[0], rtol=1e-5)
    flat = ravel_pytree(vector)[0]
    assert jax.tree.structure(vector) == jax.tree.structure(params)
    np.testing.assert_allclose(np.linalg.norm(flat), 1.0, rtol=1e-5)
    np.testing.assert_allclose(abs(flat @ top_vector), 1.0, rtol=1e-5)
    np.testing.assert_allclose(hessian @ flat, SPECTRUM[0] * flat, atol=1e-4)


def test_sharpness_converges_at_the_power_iteration_rate():
    # With one product the estimate is a Rayleigh quotient of a random vector, far from 10;
    # the error then shrinks like (4/10)^(2k).
    loss_fn, params, hessian, _ = quadratic_problem()
    errors = [abs(float(diagnostics.sharpness(loss_fn, params, hessian, iters=k)) - 10.0)
              for k in (1, 4, 8)]
    assert errors[0] > 1.0
    assert errors[1] < errors[0] * 0.4 ** 4
    assert errors[2] < max(errors[1] * 0.4 ** 6, 1e-4)


def test_sharpness_jits_and_key_only_changes_the_start():
    loss_fn, params, hessian, _ = quadratic_problem(seed=1)
    jitted = jax.jit(diagnostics.sharpness, static_argnames=("loss_fn", "iters", "return_vector"))
    for seed in (0, 1):
        value = jitted(loss_fn, params, hessian, iters=30, key=jax.random.key(seed))
        np.testing.assert_allclose(value, SPECTRUM[0], rtol=1e-5)


def test_sharpness_rejects_bad_iters():
    loss_fn, params, hessian, _ = quadratic_problem()
    with pytest.raises(ValueError, match="iters must be a positive integer, got 0"):
        diagnostics.sharpness(loss_fn, params, hessian, iters=0)


# Linear regression y = x.w* + noise, x ~ N(0, I_d), noise ~ N(0, sigma^2), squared loss /2.
# The per-example gradient at w is g = x (x.delta - noise), delta = w - w*. By Isserlis,
# E[g g^T] = |delta|^2 I + 2 delta delta^T + sigma^2 I, so with G = delta:
#   Sigma = (|delta|^2 + sigma^2) I + delta delta^T,
#   tr(Sigma) = (d + 1)|delta|^2 + d sigma^2,   B_simple = tr(Sigma) / |delta|^2.
DIM, SIGMA = 4, 0.5


def regression_problem():
    w_star = jnp.arange(DIM, dtype=jnp.float32) / DIM
    delta = jnp.array([0.6, -0.4, 0.2, 0.66332496], jnp.float32)  # |delta| = 1
    w = w_star + delta
    params = {"head": w[:1], "rest": w[1:]}  # two leaves
    trace_covariance = (DIM + 1) * 1.0 + DIM * SIGMA**2
    return params, w_star, trace_covariance, 1.0


@functools.partial(jax.jit, static_argnames="shape")
def per_example_grads(params, w_star, key, shape):
    """Gradients of 0.5 (x.w - y)^2 for independent examples; leaves have leading `shape`."""
    x_key, noise_key = jax.random.split(key)
    x = jax.random.normal(x_key, shape + (DIM,))
    y = x @ w_star + SIGMA * jax.random.normal(noise_key, shape)

    def loss(params, x, y):
        return 0.5 * (x @ ravel_pytree(params)[0] - y) ** 2

    grad = jax.grad(loss)
    for _ in shape:
        grad = jax.vmap(grad, in_axes=(None, 0, 0))
    return grad(params, x, y)


def assert_mean_within(samples, expected, z=5.0):
    """The sample mean is within z standard errors (std / sqrt(n)) of `expected`."""
    samples = np.asarray(samples, np.float64)
    standard_error = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - expected) < z * standard_error, (
        samples.mean(), expected, standard_error)
    return standard_error


def test_gradient_noise_scale_per_example_is_unbiased_on_linear_regression():
    # Small batches (B = 4) make the bias of the naive estimators large: E|g_bar|^2 is
    # |G|^2 + tr(Sigma)/4 = 2.5 here, and dividing by B instead of B - 1 shrinks tr(Sigma)
    # by 1/4. Over 20000 batches the standard error of each mean is ~1% of its value, so
    # the 5-standard-error tolerance is far tighter than either bias.
    params, w_star, trace_covariance, grad_norm_sq = regression_problem()
    grads = per_example_grads(params, w_star, jax.random.key(0), (20000, 4))
    estimates = jax.jit(jax.vmap(diagnostics.gradient_noise_scale))(grads)
    se_trace = assert_mean_within(estimates.trace_covariance, trace_covariance)
    se_norm = assert_mean_within(estimates.grad_norm_sq, grad_norm_sq)
    assert se_trace < 0.02 * trace_covariance and se_norm < 0.05 * grad_norm_sq
    ratio = estimates.trace_covariance.mean() / estimates.grad_norm_sq.mean()
    relative_error = 5 * (se_trace / trace_covariance + se_norm / grad_norm_sq)
    np.testing.assert_allclose(ratio, trace_covariance / grad_norm_sq, rtol=relative_error)
    np.testing.assert_allclose(estimates.b_simple,
                               estimates.trace_covariance / estimates.grad_norm_sq, rtol=1e-6)


def test_gradient_noise_scale_from_norms_matches_closed_form():
    # The two-batch-size estimators of appendix A.1, with B_small = 2 and B_big = 8 drawn
    # from the same 8 examples; 40000 measurements put the standard errors at ~1.5%.
    params, w_star, trace_covariance, grad_norm_sq = regression_problem()
    grads = per_example_grads(params, w_star, jax.random.key(1), (40000, 8))
    flat = jnp.concatenate([grads["head"], grads["rest"]], axis=-1)
    norm_small_sq = jnp.sum(flat[:, :2].mean(axis=1) ** 2, axis=-1)
    norm_big_sq = jnp.sum(flat.mean(axis=1) ** 2, axis=-1)
    from_norms = functools.partial(diagnostics.gradient_noise_scale_from_norms,
                                   b_small=2, b_big=8)
    each = jax.jit(jax.vmap(from_norms))(norm_small_sq, norm_big_sq)
    se_trace = assert_mean_within(each.trace_covariance, trace_covariance)
    se_norm = assert_mean_within(each.grad_norm_sq, grad_norm_sq)
    averaged = from_norms(norm_small_sq, norm_big_sq)
    np.testing.assert_allclose(averaged.trace_covariance, each.trace_covariance.mean(),
                               rtol=1e-4)
    np.testing.assert_allclose(averaged.grad_norm_sq, each.grad_norm_sq.mean(), rtol=1e-4)
    relative_error = 5 * (se_trace / trace_covariance + se_norm / grad_norm_sq)
    assert relative_error < 0.2
    np.testing.assert_allclose(averaged.b_simple, trace_covariance / grad_norm_sq,
                               rtol=relative_error)


def test_noise_scale_validation():
    with pytest.raises(ValueError, match="b_big must be a finite number > 8, got 8"):
        diagnostics.gradient_noise_scale_from_norms(1.0, 0.5, b_small=8, b_big=8)
    with pytest.raises(ValueError, match="b_small must be a positive integer, got 0"):
        diagnostics.gradient_noise_scale_from_norms(1.0, 0.5, b_small=0, b_big=8)
    with pytest.raises(ValueError, match="at least 2, got 1"):
        diagnostics.gradient_noise_scale({"w": jnp.ones((1, 3))})
    with pytest.raises(ValueError, match="share a leading batch axis"):
        diagnostics.gradient_noise_scale({"w": jnp.ones((4, 3)), "b": jnp.ones((5,))})
