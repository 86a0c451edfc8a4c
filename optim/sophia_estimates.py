"""Diagonal Hessian estimators for Sophia: Gauss-Newton-Bartlett (Sophia-G) and Hutchinson (H).

Both are pure functions of (params, data, key), cheap enough to call once every
`hessian_every` steps inside `jax.lax.cond` (or as `sophia`'s `hessian_fn`):

    estimate = gnb(logits_fn, params, inputs, key)          # logits_fn(params, inputs) -> [..., V]
    estimate = hutchinson(loss_fn, params, key)             # loss_fn(params) -> scalar

GNB: sample labels `y^ ~ softmax(logits)` from the model itself, take the gradient `g^` of the
mean cross-entropy on them, and return `N * g^ * g^` with N the number of tokens (label
positions) in the batch. Its expectation over `y^` is the diagonal of the Gauss-Newton matrix
of the mean loss (Bartlett's identity); see the paper, section 2.3. With gradient
accumulation, average `gnb_gradient` over the micro-batches and call `gnb_from_gradient`
with the total number of tokens (the official code's `total_bs * block_size`).

Hutchinson: `u * (H u)` with Rademacher `u` (entries +-1), an unbiased estimate of diag(H),
with `H u` from forward-over-reverse differentiation (`jax.jvp` of `jax.grad`).

References:
  Liu et al., 2023, https://arxiv.org/abs/2305.14342 (Algorithm 1 and 2);
  Hutchinson, 1989, "A stochastic estimator of the trace of the influence matrix".
"""
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax


def gnb_gradient(logits_fn: Callable[[optax.Params, Any], jax.Array], params: optax.Params,
                 inputs: Any, key: chex.PRNGKey) -> tuple[optax.Updates, int]:
    """Gradient of the mean cross-entropy on labels sampled from the model's own logits.

    Args:
      logits_fn: `logits_fn(params, inputs) -> logits` of shape `[..., vocab]`.
      params: the model's params. inputs: whatever `logits_fn` takes.
      key: a `jax.random` key for the labels (`jax.random.categorical(key, logits)`).

    Returns:
      `(grads, num_tokens)`: a tree like `params` and the number of label positions (an int).
    """
    logits, pullback = jax.vjp(lambda p: logits_fn(p, inputs), params)
    logits32 = jax.lax.stop_gradient(logits).astype(jnp.float32)
    labels = jax.random.categorical(key, logits32, axis=-1)
    num_tokens = logits.size // logits.shape[-1]
    # d(mean CE)/d logits = (softmax - onehot) / N: one forward and one backward pass.
    probs = jax.nn.softmax(logits32, axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    (grads,) = pullback(((probs - onehot) / num_tokens).astype(logits.dtype))
    return grads, num_tokens


def gnb_from_gradient(grads: optax.Updates, num_tokens: int) -> optax.Updates:
    """`num_tokens * g * g` per leaf: the GNB estimate from a sampled-label gradient."""
    return jax.tree.map(lambda g: num_tokens * jnp.square(g), grads)


def gnb(logits_fn: Callable[[optax.Params, Any], jax.Array], params: optax.Params, inputs: Any,
        key: chex.PRNGKey) -> optax.Updates:
    """The Gauss-Newton-Bartlett estimate of diag(Hessian) of the mean cross-entropy.

    Args:
      logits_fn: `logits_fn(params, inputs) -> logits[..., vocab]`.
      params, inputs: the model's params and a batch (the official code uses a fresh one).
      key: a `jax.random` key for the sampled labels.

    Returns:
      A tree like `params`: `N * g^2`, `g` the gradient of the mean loss on sampled labels
      and `N` the number of tokens (see `gnb_gradient`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ravine.optim.sophia_estimates import gnb
      >>> logits_fn = lambda p, x: x @ p["w"]  # e.g. lambda p, x: model.apply(p, x)
      >>> params, batch_inputs = {"w": jnp.zeros((3, 4))}, jnp.ones((2, 5, 3))
      >>> step = 0
      >>> estimate = gnb(logits_fn, params, batch_inputs, jax.random.key(step))
      >>> estimate["w"].shape, bool((estimate["w"] >= 0).all())
      ((3, 4), True)
    """
    grads, num_tokens = gnb_gradient(logits_fn, params, inputs, key)
    return gnb_from_gradient(grads, num_tokens)


def hutchinson(loss_fn: Callable[[optax.Params], jax.Array], params: optax.Params,
               key: chex.PRNGKey) -> optax.Updates:
    """Hutchinson's estimate `u * (H u)` of diag(H), H the Hessian of `loss_fn` at `params`.

    Args:
      loss_fn: `loss_fn(params) -> scalar` (close over the batch).
      params: where to take the Hessian. key: a `jax.random` key for `u`.

    Returns:
      A tree like `params` (unbiased: its mean over keys is diag(H); it can be negative).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ravine.optim.sophia_estimates import hutchinson
      >>> def loss(p, batch): return jnp.sum(batch * p ** 2)  # diag(H) = 2 * batch
      >>> params, batch, step = jnp.array([1.0, -1.0]), jnp.array([1.0, 3.0]), 0
      >>> estimate = hutchinson(lambda p: loss(p, batch), params, jax.random.key(step))
      >>> print(estimate)  # exact here: H is diagonal, so u * (H u) = diag(H)
      [2. 6.]
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    signs = treedef.unflatten([jax.random.rademacher(k, jnp.shape(leaf), jnp.result_type(leaf))
                               for k, leaf in zip(keys, leaves)])
    _, hessian_times_signs = jax.jvp(jax.grad(loss_fn), (params,), (signs,))
    return jax.tree.map(lambda u, hu: u * hu, signs, hessian_times_signs)
