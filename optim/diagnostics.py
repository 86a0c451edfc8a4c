"""Training diagnostics: Hessian sharpness and the gradient noise scale.

These are measurements, not optimizers: call them beside a training loop (say every few
hundred steps) to see where the optimizer is operating. All are jit-friendly.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _validate


def sharpness(loss_fn, params, batch, iters=20, key=None, return_vector=False):
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


def gradient_noise_scale(per_example_grads):
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


def gradient_noise_scale_from_norms(norm_small_sq, norm_big_sq, b_small, b_big):
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
