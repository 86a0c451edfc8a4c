"""Diagnostics against closed forms and dense oracles: a quadratic's and a small MLP's
Hessian spectrum (numpy eigh), linear regression's noise scale, a quadratic's loss slices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from ravine import models
from ravine.optim import diagnostics

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


# --- Hessian spectrum: Lanczos and stochastic Lanczos quadrature against dense eigh ---------


# hessian_spectrum and spectral_quadrature jitted: op by op they compile dozens of small
# programs. test_hessian_spectrum_top_k_matches_dense_eigh calls hessian_spectrum (and so
# spectral_quadrature) as it is, unjitted.
jit_hessian_spectrum = jax.jit(diagnostics.hessian_spectrum, static_argnames=(
    "loss_fn", "k", "num_lanczos", "num_probes", "grid_size", "smoothing"))
jit_spectral_quadrature = jax.jit(diagnostics.spectral_quadrature, static_argnames=(
    "loss_fn", "num_lanczos", "num_probes"))


def mlp_problem(inputs=4, width=8, outputs=2, examples=64, seed=0):
    """A tanh MLP with the squared loss on random data, away from a minimum (so H is
    indefinite), and its exact Hessian (float64) in `ravel_pytree(params)` order."""
    model = models.MLP(features=(width, outputs), activation=jnp.tanh)

    @jax.jit  # one program: op by op, each draw and init compiles its own (~4x the time)
    def data_and_params(key):
        x_key, y_key, init_key = jax.random.split(key, 3)
        batch = (jax.random.normal(x_key, (examples, inputs)),
                 jax.random.normal(y_key, (examples, outputs)))
        return batch, nn.unbox(model.init(init_key, batch[0]))

    batch, params = data_and_params(jax.random.key(seed))

    def loss_fn(params, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((model.apply(params, x) - y) ** 2, axis=-1))

    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat)
    return loss_fn, params, batch, np.asarray(hessian, np.float64)


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


def test_hessian_spectrum_top_k_matches_dense_eigh(mlp):
    loss_fn, params, batch, hessian = mlp
    exact = np.linalg.eigvalsh(hessian)[::-1]  # 58 eigenvalues, descending
    assert np.min(np.diff(-exact[:6])) > 0.03  # distinct: one Lanczos run sees each once
    assert exact[-1] < -0.3  # indefinite: "top" is the largest, not the largest |.|
    spectrum = diagnostics.hessian_spectrum(loss_fn, params, batch, k=5, num_lanczos=30,
                                            num_probes=1)
    assert spectrum.top_eigenvalues.shape == (5,)
    np.testing.assert_allclose(spectrum.top_eigenvalues, exact[:5], rtol=1e-3)


def test_hessian_spectrum_top_means_largest_not_largest_magnitude():
    # SPECTRUM shifted down: -3 - 9 = -12 has the largest magnitude; the top is 10 - 9 = 1.
    loss_fn, params, _, _ = quadratic_problem()
    hessian = quadratic_problem()[2] - 9.0 * jnp.eye(SPECTRUM.size)
    spectrum = jit_hessian_spectrum(loss_fn, params, hessian, k=3, num_lanczos=7)
    np.testing.assert_allclose(spectrum.top_eigenvalues, np.sort(SPECTRUM - 9.0)[::-1][:3],
                               rtol=1e-4)
    assert diagnostics.sharpness(loss_fn, params, hessian, iters=40) < -11.9


def test_slq_nodes_and_weights_reproduce_the_probes_moments(mlp):
    # Gauss quadrature with m nodes is exact for polynomials of degree < 2m: for each unit
    # probe v, sum_i w_i theta_i^p = v^T H^p v for p = 0, ..., 2m - 1 (here m = 4).
    loss_fn, params, batch, hessian = mlp
    quadrature = jit_spectral_quadrature(loss_fn, params, batch, num_lanczos=4, num_probes=3,
                                         key=jax.random.key(3))
    nodes, weights, probes = (np.asarray(a, np.float64) for a in quadrature)
    assert nodes.shape == weights.shape == (3, 4) and probes.shape == (3, hessian.shape[0])
    np.testing.assert_allclose(np.linalg.norm(probes, axis=1), 1.0, rtol=1e-6)
    norm = np.linalg.norm(hessian, 2)
    for v, theta, w in zip(probes, nodes, weights):
        h_v = hessian @ v
        np.testing.assert_allclose(w @ theta, v @ h_v, rtol=1e-4)
        np.testing.assert_allclose(w @ theta**2, h_v @ h_v, rtol=1e-4)
        power = v
        for p in range(8):
            np.testing.assert_allclose((w @ theta**p) / norm**p, (v @ power) / norm**p,
                                       atol=1e-5, err_msg=f"p={p}")
            power = hessian @ power


def test_lanczos_recovers_multiplicities_through_restarts():
    # H has two distinct eigenvalues: the Krylov space of any start is 2-D, so Lanczos hits
    # an invariant subspace at step 2. With a restart per breakdown, m = n steps still give
    # every eigenvalue with its multiplicity and an orthonormal basis.
    matrix = jnp.diag(jnp.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]))
    result = diagnostics.lanczos(lambda v: matrix @ v, jnp.ones(7), num_steps=7)
    np.testing.assert_allclose(result.basis @ result.basis.T, np.eye(7), atol=1e-6)
    assert abs(float(result.betas[1])) == 0.0  # the breakdown, recorded as a zero coupling
    np.testing.assert_allclose(np.linalg.eigvalsh(result.tridiagonal()),
                               [1, 1, 1, 2, 2, 2, 2], atol=1e-5)
    # The first block's quadrature is untouched: weights 3/7 on 1 and 4/7 on 2.
    nodes, vectors = np.linalg.eigh(np.asarray(result.tridiagonal(), np.float64))
    np.testing.assert_allclose([vectors[0, nodes < 1.5].__pow__(2).sum(),
                                vectors[0, nodes > 1.5].__pow__(2).sum()], [3 / 7, 4 / 7],
                               atol=1e-6)


def wasserstein_1(grid, density, eigenvalues):
    """W1 between the density on `grid` and the uniform measure on `eigenvalues`: the
    integral of |F - G| over the grid, F the density's CDF (trapezoid), G the empirical one."""
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    empirical = np.searchsorted(np.sort(eigenvalues), grid, side="right") / eigenvalues.size
    assert grid[0] < eigenvalues.min() and grid[-1] > eigenvalues.max()
    return np.trapezoid(np.abs(cdf - empirical), grid)


def test_spectral_density_integrates_to_one_and_is_close_to_the_exact_spectrum(mlp):
    loss_fn, params, batch, hessian = mlp
    exact = np.linalg.eigvalsh(hessian)
    spectrum = jit_hessian_spectrum(loss_fn, params, batch, num_lanczos=20, num_probes=16,
                                    grid_size=2048)
    grid, density = np.asarray(spectrum.grid, np.float64), np.asarray(spectrum.density)
    assert grid.shape == density.shape == (2048,) and np.all(np.diff(grid) > 0)
    assert np.all(density >= 0)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    assert wasserstein_1(grid, density, exact) <= 0.05 * (exact.max() - exact.min())


def test_spectral_density_moments_match_hutchinson():
    # 180 parameters. One probe's relative standard deviation is ~0.33 (tr H) and ~0.25
    # (tr H^2) for SLQ's unit Gaussian probes, ~0.31 and ~0.24 for Rademacher ones (computed
    # from the exact H), so 800 and 2000 probes put the two estimates' difference within
    # ~1.3%: 5% is about 4 standard errors.
    loss_fn, params, batch, hessian = mlp_problem(inputs=6, width=16, outputs=4, examples=64,
                                                  seed=2)
    size = hessian.shape[0]
    smoothing = 0.01
    # Each probe's quadrature is exact for polynomials of degree < 2m: m = 4 steps already
    # give v^T H v and |H v|^2 exactly, so all the error is the probes' sampling.
    spectrum = jit_hessian_spectrum(loss_fn, params, batch, k=1, num_lanczos=4,
                                    num_probes=800, key=jax.random.key(1), smoothing=smoothing)
    grid, density = np.asarray(spectrum.grid, np.float64), np.asarray(spectrum.density)
    sigma = smoothing * (grid[-1] - grid[0]) / (1 + 12 * smoothing)  # the grid is +- 6 sigma
    first = np.trapezoid(grid * density, grid)
    second = np.trapezoid(grid**2 * density, grid) - sigma**2  # the Gaussian adds sigma^2

    # Hutchinson, independently: E[z^T H z] = tr(H) and E[|H z|^2] = tr(H^2), z Rademacher.
    _, matvec = diagnostics._hessian_matvec(loss_fn, params, batch)
    z = jax.random.rademacher(jax.random.key(7), (2000, size), jnp.float32)
    h_z = np.asarray(jax.jit(jax.vmap(matvec))(z), np.float64)
    hutchinson_first = np.mean(np.sum(np.asarray(z) * h_z, axis=1)) / size
    hutchinson_second = np.mean(np.sum(h_z**2, axis=1)) / size
    assert first == pytest.approx(hutchinson_first, rel=0.05)
    assert second == pytest.approx(hutchinson_second, rel=0.05)
    exact = np.linalg.eigvalsh(hessian)
    assert hutchinson_first == pytest.approx(np.mean(exact), rel=0.05)
    assert hutchinson_second == pytest.approx(np.mean(exact**2), rel=0.05)


def test_hessian_spectrum_jits_and_validates(mlp):
    loss_fn, params, batch, _ = mlp
    jitted = jax.jit(diagnostics.hessian_spectrum,
                     static_argnames=("loss_fn", "k", "num_lanczos", "num_probes", "grid_size"))
    spectrum = jitted(loss_fn, params, batch, k=2, num_lanczos=30, num_probes=2, grid_size=64)
    np.testing.assert_allclose(spectrum.top_eigenvalues,
                               np.linalg.eigvalsh(mlp[3])[::-1][:2], rtol=1e-3)
    assert spectrum.grid.shape == spectrum.density.shape == (64,)
    with pytest.raises(ValueError, match=r"k must be at most .* = 10, got 11"):
        diagnostics.hessian_spectrum(loss_fn, params, batch, k=11, num_lanczos=10)
    with pytest.raises(ValueError, match="smoothing must be a finite number > 0.0, got 0"):
        diagnostics.hessian_spectrum(loss_fn, params, batch, smoothing=0)
    with pytest.raises(ValueError, match="num_probes must be a positive integer, got 0"):
        diagnostics.hessian_spectrum(loss_fn, params, batch, num_probes=0)
    with pytest.raises(ValueError, match="num_steps must be at most the dimension 3, got 4"):
        diagnostics.lanczos(lambda v: v, jnp.ones(3), num_steps=4)


# --- Loss landscapes -----------------------------------------------------------------------


def test_filter_normalize_gives_each_filter_the_weights_norm():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)},
              "conv": rng.normal(size=(3, 3, 2, 4)), "gain": np.ones(())}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                             params)
    direction["conv"] = direction["conv"].at[..., 1].set(0.0)  # a zero filter stays zero
    normalized = diagnostics.filter_normalize(direction, params)
    kernel, d_kernel = params["dense"]["kernel"], normalized["dense"]["kernel"]
    np.testing.assert_allclose(np.linalg.norm(d_kernel, axis=0), np.linalg.norm(kernel, axis=0),
                               rtol=1e-5)
    # Each column keeps its direction: a positive multiple of the random one.
    cosine = (np.sum(d_kernel * direction["dense"]["kernel"], axis=0)
              / np.linalg.norm(d_kernel, axis=0)
              / np.linalg.norm(direction["dense"]["kernel"], axis=0))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
    conv_norms = np.sqrt(np.sum(np.asarray(normalized["conv"]) ** 2, axis=(0, 1, 2)))
    want = np.sqrt(np.sum(np.asarray(params["conv"]) ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(np.delete(conv_norms, 1), np.delete(want, 1), rtol=1e-5)
    assert conv_norms[1] == 0.0
    assert not np.any(normalized["dense"]["bias"]) and normalized["gain"] == 0.0


def linear_quadratic(seed=0):
    """f(x) = 0.5 x^T A x + b.x + 1 on two leaves, and two directions."""
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(7, 7))
    matrix = jnp.asarray(matrix @ matrix.T - 3 * np.eye(7), jnp.float32)  # indefinite too
    b = jnp.asarray(rng.normal(size=7), jnp.float32)

    def loss_fn(params, batch):
        x = ravel_pytree(params)[0]
        return 0.5 * x @ batch[0] @ x + batch[1] @ x + 1.0

    params = {"a": jnp.asarray(rng.normal(size=3), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
    d1, d2 = ({"a": jnp.asarray(rng.normal(size=3), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)} for _ in range(2))
    return loss_fn, params, (matrix, b), d1, d2


def test_loss_surface_is_the_closed_form_parabola_on_a_quadratic():
    loss_fn, params, batch, d1, d2 = linear_quadratic()
    matrix, b = (np.asarray(t, np.float64) for t in batch)
    x, u, w = (np.asarray(ravel_pytree(t)[0], np.float64) for t in (params, d1, d2))
    f0, g = 0.5 * x @ matrix @ x + b @ x + 1.0, matrix @ x + b
    coords = jnp.linspace(-2.0, 2.0, 9)
    c = np.asarray(coords, np.float64)

    line = diagnostics.loss_surface(loss_fn, params, batch, (d1,), coords)
    assert line.shape == (9,)
    np.testing.assert_allclose(line, f0 + c * (g @ u) + 0.5 * c**2 * (u @ matrix @ u),
                               rtol=1e-4, atol=1e-4)
    surface = diagnostics.loss_surface(loss_fn, params, batch, [d1, d2], coords)
    assert surface.shape == (9, 9)
    a, bb = c[:, None], c[None, :]  # rows follow d1, columns d2
    want = (f0 + a * (g @ u) + bb * (g @ w)
            + 0.5 * (a**2 * (u @ matrix @ u) + 2 * a * bb * (u @ matrix @ w)
                     + bb**2 * (w @ matrix @ w)))
    np.testing.assert_allclose(surface, want, rtol=1e-4, atol=1e-4)


def test_loss_surface_centre_is_the_loss(mlp):
    loss_fn, params, batch, _ = mlp

    @jax.jit  # one program: op by op, each leaf's draw compiles its own
    def directions(key):
        return [diagnostics.filter_normalize(optax.tree.random_like(k, params), params)
                for k in jax.random.split(key)]

    d1, d2 = directions(jax.random.key(1))
    coords = jnp.linspace(-1.0, 1.0, 5)
    centre = loss_fn(params, batch)
    line = diagnostics.loss_surface(loss_fn, params, batch, (d1,), coords)
    surface = jax.jit(diagnostics.loss_surface, static_argnames="loss_fn")(
        loss_fn, params, batch, (d1, d2), coords)
    np.testing.assert_allclose(line[2], centre, rtol=1e-6)  # one ulp apart on some CPUs
    np.testing.assert_allclose(surface[2, 2], centre, rtol=1e-6)  # jit may fuse differently
    np.testing.assert_allclose(surface[:, 2], line, rtol=1e-6)  # b = 0 is the 1-D slice


def test_loss_surface_validates_its_arguments():
    loss_fn, params, batch, d1, _ = linear_quadratic()
    with pytest.raises(ValueError, match="directions must be a tuple of one or two .* got dict"):
        diagnostics.loss_surface(loss_fn, params, batch, d1, jnp.zeros(3))
    with pytest.raises(ValueError, match="got tuple of length 3"):
        diagnostics.loss_surface(loss_fn, params, batch, (d1, d1, d1), jnp.zeros(3))
    with pytest.raises(ValueError, match="coords must be a 1-D array, got shape"):
        diagnostics.loss_surface(loss_fn, params, batch, (d1,), jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"directions\[0\] must have the leaf shapes"):
        diagnostics.loss_surface(loss_fn, params, batch, ({"a": jnp.ones(3), "b": jnp.ones(4)},),
                                 jnp.zeros(3))
    with pytest.raises(ValueError, match="direction must have the tree structure of params"):
        diagnostics.filter_normalize({"a": jnp.ones(3)}, params)
