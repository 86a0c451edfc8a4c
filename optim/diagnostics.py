"""Training diagnostics: curvature, the gradient noise scale and loss landscapes.

These are measurements, not optimizers: call them beside a training loop (say every few
hundred steps) to see where the optimizer is operating. All are jit-friendly.

- `sharpness`: the top Hessian eigenvalue by power iteration.
- `hessian_spectrum`: the top-k eigenvalues (Lanczos) and the spectral density (stochastic
  Lanczos quadrature); `lanczos` and `spectral_quadrature` are its building blocks.
- `gradient_noise_scale`, `gradient_noise_scale_from_norms`: McCandlish et al.'s B_simple.
- `filter_normalize`, `loss_surface`: 1-D and 2-D slices of the loss (Li et al. 2018).
"""
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from ravine.optim import _validate


# `loss_fn(params, batch) -> scalar`, as every function below takes it.
LossFn = Callable[[optax.Params, Any], jax.Array]


def sharpness(loss_fn: LossFn, params: optax.Params, batch: Any, iters: int = 20,
              key: Optional[chex.PRNGKey] = None, return_vector: bool = False
              ) -> Union[jax.Array, tuple[jax.Array, optax.Params]]:
    """Top Hessian eigenvalue of `loss_fn(params, batch)` by power iteration.

    Each iteration costs one Hessian-vector product, `H v = jvp(grad(loss), params, v)`
    (forward-over-reverse; the Hessian is never formed):

        v_0 ~ N(0, I) normalized,   lambda_k = <v_k, H v_k>,   v_{k+1} = H v_k / |H v_k|.

    After `iters` products it returns `lambda_{iters-1}`, the Rayleigh quotient of the last
    vector, whose error shrinks like (lambda_2 / lambda_1)^(2k). Power iteration finds the
    eigenvalue of largest *magnitude*; near a minimum, and at the edge of stability, that is
    the top (positive) one. Cohen et al. 2021, "Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability": full-batch GD with step size eta drives this
    sharpness up to about 2/eta and then hovers there.

    Jit it with `jax.jit(sharpness, static_argnames=("loss_fn", "iters", "return_vector"))`
    or call it inside a jitted function.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      params: pytree at which the Hessian is taken.
      batch: passed through to `loss_fn`; one fixed batch, so that every product is taken
        with the same Hessian.
      iters: number of Hessian-vector products (positive int).
      key: PRNG key for the starting vector; `None` means `jax.random.key(0)`.
      return_vector: also return the unit-norm eigenvector estimate `v_iters` (params-shaped).

    Returns:
      The eigenvalue as a scalar array, or `(eigenvalue, vector)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from ravine.optim.diagnostics import sharpness
      >>> def loss_fn(p, batch): return 0.5 * jnp.sum(batch * p ** 2)  # H = diag(batch)
      >>> print(f"{sharpness(loss_fn, jnp.zeros(3), jnp.array([1.0, 4.0, 2.0])):.3f}")
      4.000
    """
    _validate.positive_int("iters", iters)
    key = jax.random.key(0) if key is None else key
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))

    def normalized(tree, fallback):
        norm = optax.tree.norm(tree)
        # A zero product (a flat direction) keeps the previous vector instead of dividing by 0.
        return jax.tree.map(lambda t, f: jnp.where(norm > 0, t / norm, f), tree, fallback)

    def power_step(_, carry):
        vector, _ = carry
        h_vector = jax.jvp(grad_fn, (params,), (vector,))[1]
        return normalized(h_vector, vector), optax.tree.vdot(vector, h_vector)

    start = optax.tree.random_like(key, params, jax.random.normal)
    start = normalized(start, start)
    eigenvalue = jnp.zeros([], jnp.result_type(*jax.tree.leaves(params)))
    vector, eigenvalue = jax.lax.fori_loop(0, iters, power_step, (start, eigenvalue))
    return (eigenvalue, vector) if return_vector else eigenvalue


class NoiseScale(NamedTuple):
    """The simple gradient noise scale and its two unbiased ingredients.

    `b_simple = trace_covariance / grad_norm_sq` is a ratio of unbiased estimators and
    so is itself biased; to average over many steps, average `trace_covariance` and
    `grad_norm_sq` separately and take the ratio of the averages (McCandlish et al. 2018,
    appendix A.1).
    """

    b_simple: jax.Array  # tr(Sigma) / |G|^2: the batch size where noise and signal balance.
    trace_covariance: jax.Array  # estimate of tr(Sigma), Sigma the per-example covariance.
    grad_norm_sq: jax.Array  # estimate of |G|^2, G the true (full-data) gradient.


def gradient_noise_scale(per_example_grads: optax.Updates) -> NoiseScale:
    """B_simple = tr(Sigma) / |G|^2 from a batch of per-example gradients.

    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training". With B
    per-example gradients g_i and their mean g_bar:

        tr(Sigma) ~ S      = sum_i |g_i - g_bar|^2 / (B - 1)        (unbiased),
        |G|^2     ~ |G|^2  = |g_bar|^2 - S / B                       (unbiased, since
                                                   E|g_bar|^2 = |G|^2 + tr(Sigma) / B).

    Per-example gradients come from `jax.vmap(jax.grad(loss), in_axes=(None, 0))`.

    Args:
      per_example_grads: pytree whose leaves all have the same leading batch axis B >= 2.

    Returns:
      `NoiseScale(b_simple, trace_covariance, grad_norm_sq)`, scalars in float32 or wider.
    """
    leaves = jax.tree.leaves(per_example_grads)
    batch_sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(batch_sizes) != 1 or None in batch_sizes:
        raise ValueError("per_example_grads leaves must share a leading batch axis, "
                         f"got leading sizes {sorted(map(str, batch_sizes))}")
    (batch_size,) = batch_sizes
    if batch_size < 2:
        raise ValueError(f"per_example_grads needs a batch of at least 2, got {batch_size}")
    leaves = [leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32)) for leaf in leaves]
    means = [leaf.mean(axis=0) for leaf in leaves]
    trace_covariance = sum(jnp.sum((leaf - mean) ** 2) for leaf, mean in zip(leaves, means))
    trace_covariance = trace_covariance / (batch_size - 1)
    mean_norm_sq = sum(jnp.sum(mean**2) for mean in means)
    return _noise_scale(trace_covariance, mean_norm_sq - trace_covariance / batch_size)


def gradient_noise_scale_from_norms(norm_small_sq: jax.typing.ArrayLike,
                                    norm_big_sq: jax.typing.ArrayLike, b_small: int,
                                    b_big: int) -> NoiseScale:
    """B_simple = tr(Sigma) / |G|^2 from squared norms of mean gradients at two batch sizes.

    McCandlish et al. 2018, appendix A.1. Since E|G_B|^2 = |G|^2 + tr(Sigma) / B, the
    squared norms of the mean gradient over `b_small` and over `b_big` examples give the
    unbiased estimators

        |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small),
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big).

    This needs no per-example gradients: in data-parallel training take `b_small` = the
    per-device batch (|G_small|^2 averaged over devices) and `b_big` = the global batch.
    Pass arrays of many measurements to average each estimator before the ratio.

    Args:
      norm_small_sq: |G_small|^2, a scalar or an array of measurements.
      norm_big_sq: |G_big|^2, broadcastable against `norm_small_sq`.
      b_small: the small batch size (positive int).
      b_big: the big batch size (int > b_small).

    Returns:
      `NoiseScale(b_simple, trace_covariance, grad_norm_sq)` with the averaged estimators.
    """
    _validate.positive_int("b_small", b_small)
    _validate.positive_int("b_big", b_big)
    _validate.greater_than("b_big", b_big, b_small)
    norm_small_sq, norm_big_sq = jnp.broadcast_arrays(norm_small_sq, norm_big_sq)
    grad_norm_sq = (b_big * norm_big_sq - b_small * norm_small_sq) / (b_big - b_small)
    trace_covariance = (norm_small_sq - norm_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return _noise_scale(jnp.mean(trace_covariance), jnp.mean(grad_norm_sq))


def _noise_scale(trace_covariance, grad_norm_sq):
    return NoiseScale(trace_covariance / grad_norm_sq, trace_covariance, grad_norm_sq)


# --- The Hessian's spectrum: Lanczos and stochastic Lanczos quadrature ---------------------


class Lanczos(NamedTuple):
    """`num_steps` Lanczos steps: the tridiagonal T = V A V^T and the orthonormal basis V."""

    alphas: jax.Array  # (m,) the diagonal of T.
    betas: jax.Array  # (m - 1,) the off-diagonal of T.
    basis: jax.Array  # (m, n) orthonormal rows v_0 (the normalised start), ..., v_{m-1}.

    def tridiagonal(self) -> jax.Array:
        """T as a dense (m, m) matrix."""
        return (jnp.diag(self.alphas) + jnp.diag(self.betas, 1) + jnp.diag(self.betas, -1))


def lanczos(matvec: Callable[[jax.Array], jax.Array], start: jax.Array, num_steps: int,
            key: Optional[chex.PRNGKey] = None) -> Lanczos:
    """Lanczos tridiagonalisation of a symmetric operator, with full reorthogonalisation.

    From v_0 = start / |start|, each step takes one product w = A v_j and

        alpha_j = <v_j, w>,   w <- w - V^T (V w)  (twice),   beta_j = |w|,   v_{j+1} = w / beta_j,

    where V holds every vector so far: subtracting the projection on all of them (not only
    the last two, as the three-term recurrence does) keeps V orthonormal to working precision,
    so no spurious copies of converged eigenvalues ("ghosts") appear. The eigenvalues of T
    (Ritz values) approximate the extreme eigenvalues of A first; the largest Ritz value
    never exceeds the largest eigenvalue (Cauchy interlacing). If w vanishes the basis spans
    an invariant subspace: the next vector is then a random one orthogonal to V and T's
    off-diagonal entry is 0, which leaves the Ritz values and quadrature weights found so far
    unchanged.

    Args:
      matvec: `v -> A v` on 1-D arrays, A symmetric (e.g. a Hessian-vector product).
      start: the 1-D starting vector (nonzero); its norm does not matter.
      num_steps: m, the number of products (1 <= m <= start.size).
      key: PRNG key for restarts after an invariant subspace; `None` means `jax.random.key(0)`.

    Returns:
      `Lanczos(alphas, betas, basis)`.

    References:
      Golub & Van Loan, "Matrix Computations", 4th ed., section 10.1.
    """
    _validate.positive_int("num_steps", num_steps)
    if start.ndim != 1:
        raise ValueError(f"start must be a 1-D vector, got shape {start.shape}")
    size = start.shape[0]
    if num_steps > size:
        raise ValueError(f"num_steps must be at most the dimension {size}, got {num_steps}")
    key = jax.random.key(0) if key is None else key
    dtype = jnp.promote_types(start.dtype, jnp.float32)
    start = start.astype(dtype)
    basis = jnp.zeros((num_steps, size), dtype).at[0].set(start / jnp.linalg.norm(start))

    def orthogonalize(w, basis):
        # Classical Gram-Schmidt against every stored row, twice ("twice is enough"); rows
        # not yet filled are zero and subtract nothing.
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def step(j, carry):
        basis, alphas, betas, scale = carry
        v = basis[j]
        w = matvec(v).astype(dtype)
        alpha = jnp.vdot(v, w)
        scale = jnp.maximum(scale, jnp.linalg.norm(w))  # a lower bound on |A|
        w = orthogonalize(w, basis)
        beta = jnp.linalg.norm(w)
        invariant = beta <= 4 * jnp.finfo(dtype).eps * scale
        fresh = orthogonalize(jax.random.normal(jax.random.fold_in(key, j), (size,), dtype),
                              basis)
        following = jnp.where(invariant, fresh / jnp.linalg.norm(fresh), w / beta)
        # The last step has no following vector: mode="drop" ignores the write at row m.
        basis = basis.at[j + 1].set(following, mode="drop")
        betas = betas.at[j].set(jnp.where(invariant, 0.0, beta))
        return basis, alphas.at[j].set(alpha), betas, scale

    carry = (basis, jnp.zeros((num_steps,), dtype), jnp.zeros((num_steps,), dtype),
             jnp.zeros([], dtype))
    basis, alphas, betas, _ = jax.lax.fori_loop(0, num_steps, step, carry)
    return Lanczos(alphas, betas[:-1], basis)


def _hessian_matvec(loss_fn, params, batch):
    """The flattened params and `v -> H v` on flat vectors (forward-over-reverse)."""
    flat, unravel = ravel_pytree(params)
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))

    def matvec(v):
        return ravel_pytree(jax.jvp(grad_fn, (params,), (unravel(v),))[1])[0]

    return flat, matvec


class Quadrature(NamedTuple):
    """Gauss quadrature of the Hessian's spectral measure as seen from each probe vector.

    For a unit probe v, `sum_i weights[l, i] * f(nodes[l, i])` approximates v^T f(H) v and is
    exact for polynomials f of degree < 2m; averaged over probes it estimates tr f(H) / n.
    """

    nodes: jax.Array  # (probes, m) Ritz values (eigenvalues of each T), ascending.
    weights: jax.Array  # (probes, m) squared first components of T's eigenvectors; rows sum to 1.
    probes: jax.Array  # (probes, n) the unit probe vectors, in `ravel_pytree(params)` order.


def spectral_quadrature(loss_fn: LossFn, params: optax.Params, batch: Any,
                        num_lanczos: int = 80, num_probes: int = 1,
                        key: Optional[chex.PRNGKey] = None) -> Quadrature:
    """Stochastic Lanczos quadrature nodes and weights of the Hessian of `loss_fn`.

    For each probe v ~ N(0, I) / |.|, `num_lanczos` Lanczos steps on H from v give T =
    U diag(theta) U^T; then v^T f(H) v ~ sum_i U[0, i]^2 f(theta_i) (Golub & Meurant). As
    E[v^T f(H) v] = tr f(H) / n for v uniform on the sphere, the spectral density
    (1/n) sum_j delta(t - lambda_j) is estimated by the average over probes of
    sum_i U[0, i]^2 delta(t - theta_i).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      params: pytree at which the Hessian is taken (its leaves are flattened in
        `jax.flatten_util.ravel_pytree` order).
      batch: passed through to `loss_fn`.
      num_lanczos: Lanczos steps per probe; capped at the number of parameters n (with
        m = n the nodes are H's eigenvalues).
      num_probes: number of probe vectors (positive int).
      key: PRNG key for the probes; `None` means `jax.random.key(0)`.

    Returns:
      `Quadrature(nodes, weights, probes)`.

    References:
      Ghorbani, Krishnan & Xiao 2019, "An Investigation into Neural Net Optimization via
      Hessian Eigenvalue Density", https://arxiv.org/abs/1901.10159.
    """
    _validate.positive_int("num_lanczos", num_lanczos)
    _validate.positive_int("num_probes", num_probes)
    key = jax.random.key(0) if key is None else key
    probe_key, restart_key = jax.random.split(key)
    flat, matvec = _hessian_matvec(loss_fn, params, batch)
    num_steps = min(num_lanczos, flat.size)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)
    probes = jax.random.normal(probe_key, (num_probes, flat.size), dtype)
    probes = probes / jnp.linalg.norm(probes, axis=-1, keepdims=True)

    def one_probe(probe):
        nodes, vectors = jnp.linalg.eigh(lanczos(matvec, probe, num_steps,
                                                 restart_key).tridiagonal())
        return nodes, vectors[0] ** 2

    nodes, weights = jax.vmap(one_probe)(probes)
    return Quadrature(nodes, weights, probes)


class HessianSpectrum(NamedTuple):
    """The top of the Hessian's spectrum and its smoothed eigenvalue density."""

    top_eigenvalues: jax.Array  # (k,) the largest (algebraic) eigenvalues, descending.
    grid: jax.Array  # (grid_size,) evenly spaced points covering every node +- 6 sigma.
    density: jax.Array  # (grid_size,) the estimated density on `grid`; integrates to 1.


def hessian_spectrum(loss_fn: LossFn, params: optax.Params, batch: Any, k: int = 5,
                     num_lanczos: int = 80, key: Optional[chex.PRNGKey] = None,
                     num_probes: int = 4, grid_size: int = 1024,
                     smoothing: float = 0.01) -> HessianSpectrum:
    """Top-k Hessian eigenvalues (Lanczos) and the spectral density (SLQ) of `loss_fn`.

    Runs `spectral_quadrature`: `num_probes` Lanczos runs of `num_lanczos` Hessian-vector
    products each, with full reorthogonalisation. The runs are batched (vmap), so their
    bases take num_probes * num_lanczos * n floats: for a large model use few probes.

    - Top eigenvalues: for each probe the k largest Ritz values; by Cauchy interlacing the
      i-th largest Ritz value is at most the i-th largest eigenvalue, so the maximum over
      probes is the best of several lower bounds. Lanczos finds well separated extreme
      eigenvalues in few steps; it sees one copy of a repeated eigenvalue per run.
    - Density: phi(t) = mean over probes of sum_i w_i N(t; theta_i, sigma^2), the quadrature
      of each probe smoothed by a Gaussian of width sigma = smoothing * (theta_max -
      theta_min), on a grid reaching 6 sigma past the extreme nodes. Its mean is the
      estimate of tr(H)/n, and its second moment minus sigma^2 that of tr(H^2)/n.

    Example (jit with the non-array arguments static):

        spectrum = jax.jit(hessian_spectrum, static_argnames=("loss_fn", "k", "num_lanczos",
            "num_probes", "grid_size"))(loss_fn, params, batch, key=jax.random.key(0))
        plt.semilogy(spectrum.grid, spectrum.density)

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      params: pytree at which the Hessian is taken.
      batch: passed through to `loss_fn`; one fixed batch, so every product uses the same H.
      k: how many of the top eigenvalues to return (at most min(num_lanczos, n)).
      num_lanczos: Lanczos steps per probe; capped at the number of parameters n.
      key: PRNG key for the probes; `None` means `jax.random.key(0)`.
      num_probes: number of Lanczos runs (random start vectors).
      grid_size: number of points at which the density is sampled (at least 2).
      smoothing: Gaussian width as a fraction of the range of the nodes (> 0).

    Returns:
      `HessianSpectrum(top_eigenvalues, grid, density)`.

    References:
      Ghorbani, Krishnan & Xiao 2019, "An Investigation into Neural Net Optimization via
      Hessian Eigenvalue Density", https://arxiv.org/abs/1901.10159.
      Lin, Saad & Yang 2016, "Approximating Spectral Densities of Large Matrices",
      https://arxiv.org/abs/1308.5467.
    """
    _validate.positive_int("k", k)
    _validate.positive_int("num_lanczos", num_lanczos)
    _validate.positive_int("grid_size", grid_size)
    _validate.greater_than("grid_size", grid_size, 1)
    _validate.greater_than("smoothing", smoothing, 0.0)
    size = sum(jnp.size(leaf) for leaf in jax.tree.leaves(params))
    if k > min(num_lanczos, size):
        raise ValueError(f"k must be at most min(num_lanczos, number of parameters) = "
                         f"{min(num_lanczos, size)}, got {k}")
    quadrature = spectral_quadrature(loss_fn, params, batch, num_lanczos, num_probes, key)
    nodes, weights = quadrature.nodes, quadrature.weights
    top = jnp.max(nodes[:, ::-1][:, :k], axis=0)

    low, high = jnp.min(nodes), jnp.max(nodes)
    # A single distinct node (H = c I) has no range: then the width scales with |c| (or 1).
    spread = jnp.where(high > low, high - low, jnp.maximum(jnp.abs(high), 1.0))
    sigma = smoothing * spread
    grid = jnp.linspace(low - 6 * sigma, high + 6 * sigma, grid_size)
    gaussians = jnp.exp(-0.5 * ((grid[:, None] - nodes.reshape(-1)) / sigma) ** 2)
    gaussians = gaussians / (sigma * jnp.sqrt(2 * jnp.pi))
    density = gaussians @ (weights.reshape(-1) / nodes.shape[0])
    return HessianSpectrum(top, grid, density)


# --- Loss landscapes (Li et al. 2018) ---------------------------------------------------


def filter_normalize(direction: optax.Params, params: optax.Params) -> optax.Params:
    """Scales each filter of `direction` to the norm of the same filter of `params`.

    A filter is one output unit: for a kernel of shape (..., fan_out), as Flax's Dense and
    Conv store them, filter j is `kernel[..., j]`. Leaves with ndim <= 1 (biases, norm gains)
    are set to zero, the paper's default. After this, moving a distance `a` along the
    direction changes every filter by `a` times its own norm, so landscapes of networks with
    different weight scales (and of scale-invariant layers) can be compared. A zero filter of
    the direction stays zero.

    Example:

        direction = filter_normalize(optax.tree.random_like(key, params), params)

    Args:
      direction: pytree with the structure and shapes of `params` (e.g. Gaussian noise).
      params: the weights whose filter norms the direction takes.

    Returns:
      The normalised direction (same structure as `params`).

    References:
      Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the Loss Landscape of Neural
      Nets", https://arxiv.org/abs/1712.09913.
    """
    _check_like_params("direction", direction, params)

    def normalize(d, p):
        if p.ndim <= 1:
            return jnp.zeros_like(d)
        axes = tuple(range(p.ndim - 1))
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
        p_norm = jnp.sqrt(jnp.sum(jnp.square(p), axis=axes, keepdims=True))
        return (d * (p_norm / jnp.where(d_norm > 0, d_norm, 1.0))).astype(d.dtype)

    return jax.tree.map(normalize, direction, params)


def loss_surface(loss_fn: LossFn, params: optax.Params, batch: Any,
                 directions: Sequence[optax.Params], coords: jax.typing.ArrayLike) -> jax.Array:
    """The loss on a 1-D or 2-D slice through `params`: `loss_fn(params + a d1 (+ b d2))`.

    With one direction returns `losses[i] = loss(params + coords[i] d1)`, shape (n,); with
    two, `losses[i, j] = loss(params + coords[i] d1 + coords[j] d2)`, shape (n, n) (rows
    follow d1: for `plt.contour(coords, coords, losses)` pass `losses.T`). Rows are
    evaluated one after another, the points of a row together (vmap), so memory grows with
    n, not n^2. Use `filter_normalize`d random directions for Li et al.'s plots.

    Example:

        keys = jax.random.split(key)
        d1, d2 = (filter_normalize(optax.tree.random_like(k, params), params) for k in keys)
        surface = loss_surface(loss_fn, params, batch, (d1, d2), jnp.linspace(-1, 1, 25))

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      params: the centre of the slice.
      batch: passed through to `loss_fn`.
      directions: a tuple (or list) of one or two pytrees shaped like `params`.
      coords: 1-D array of the n step sizes along each direction.

    Returns:
      The losses, shape (n,) or (n, n).

    References:
      Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the Loss Landscape of Neural
      Nets", https://arxiv.org/abs/1712.09913.
    """
    if not isinstance(directions, (tuple, list)) or len(directions) not in (1, 2):
        raise ValueError("directions must be a tuple of one or two params-shaped pytrees, "
                         f"got {type(directions).__name__}"
                         + (f" of length {len(directions)}"
                            if isinstance(directions, (tuple, list)) else ""))
    for i, direction in enumerate(directions):
        _check_like_params(f"directions[{i}]", direction, params)
    coords = jnp.asarray(coords)
    if coords.ndim != 1:
        raise ValueError(f"coords must be a 1-D array, got shape {coords.shape}")

    def loss_at(steps):
        def shift(p, *ds):
            return (p + sum(s * d for s, d in zip(steps, ds))).astype(p.dtype)

        return loss_fn(jax.tree.map(shift, params, *directions), batch)

    if len(directions) == 1:
        return jax.vmap(lambda a: loss_at((a,)))(coords)
    row = jax.vmap(lambda a, b: loss_at((a, b)), in_axes=(None, 0))
    return jax.lax.map(lambda a: row(a, coords), coords)


def _check_like_params(name, tree, params):
    if jax.tree.structure(tree) != jax.tree.structure(params):
        raise ValueError(f"{name} must have the tree structure of params, got "
                         f"{jax.tree.structure(tree)}")
    shapes, expected = ([jnp.shape(x) for x in jax.tree.leaves(t)] for t in (tree, params))
    if shapes != expected:
        raise ValueError(f"{name} must have the leaf shapes of params {expected}, got {shapes}")
