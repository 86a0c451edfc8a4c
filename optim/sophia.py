"""Sophia: momentum divided by an EMA of a diagonal Hessian estimate, clipped per coordinate.

    m_t = b1 m_{t-1} + (1 - b1) g_t                       (no bias correction)
    h_t = b2 h_{t-k} + (1 - b2) h^_t   on refresh steps, else h_t = h_{t-1}
    step = -lr * (sign(m_t) * min(|m_t| / (rho * max(h_t, 0) + eps), 1) + wd * params)

as the official SophiaG code (Liuhong99/Sophia, `sophia.py`), with its defaults b1=0.965,
b2=0.99, rho=0.04, eps=1e-15, weight_decay=0.1 (decoupled, times lr). The estimate `h^`
comes from outside through Optax's extra-args interface, so the transform stays a pure
function of its inputs:

    updates, state = tx.update(grads, state, params, hessian_diag=estimate)  # fold it in
    updates, state = tx.update(grads, state, params)                         # keep h
    updates, state = tx.update(grads, state, params, hessian_fn=fn)  # fn(params) -> estimate,
                                         # called (in a lax.cond) only on refresh steps

Refresh steps are the steps `t` (from 0) with `t % hessian_every == 0`, as the paper's
Algorithm 3 (t mod k = 1, counting from 1): the first step already has an estimate. The
estimate is folded in before the step it is given at, so it is used at once. (The official
training loop refreshes after steps k-1, 2k-1, ..., at the updated params: the same
schedule shifted by one step, with sign(m) steps until the first refresh. Pass
`hessian_diag` yourself to follow it.)

The estimators are in `optim.sophia_estimates`: Gauss-Newton-Bartlett (Sophia-G, the default
and the official code's) and Hutchinson (Sophia-H). With GNB the estimate is already scaled
by the number of tokens (the official code multiplies by `bs = total_bs * block_size` at
use); the `max(h, 0)` only matters for Hutchinson's estimates, which can be negative
(the official SophiaH takes `relu(h)` there too).

References:
  Liu et al., 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
  Pre-training", https://arxiv.org/abs/2305.14342
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import decay_and_scale

ESTIMATORS = ("gnb", "hutchinson")


class SophiaState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates  # momentum m
    hessian: optax.Updates  # EMA h of the diagonal Hessian estimates


def scale_by_sophia(b1=0.965, b2=0.99, rho=0.04, eps=1e-15, hessian_every=10):
    """The Sophia direction `sign(m) * min(|m| / (rho * max(h, 0) + eps), 1)`.

    Args:
      b1: momentum decay, in [0, 1). b2: decay of the Hessian EMA (per refresh), in [0, 1).
      rho: the clipping scale (the official code's `rho`; the paper's gamma).
      eps: keeps the ratio finite where h is 0 (there the step is sign(m)).
      hessian_every: refresh interval k, used when the estimate comes as `hessian_fn`.

    Returns:
      An `optax.GradientTransformationExtraArgs`; `update(grads, state, params,
      hessian_diag=None, hessian_fn=None)` (see the module docstring).

    Example:
      >>> tx = optax.chain(scale_by_sophia(), optax.scale(-1e-4))
      >>> updates, state = tx.update(grads, state, params, hessian_diag=estimate)
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("rho", rho)
    _validate.non_negative("eps", eps)
    _validate.positive_int("hessian_every", hessian_every)

    def init_fn(params):
        return SophiaState(count=jnp.zeros([], jnp.int32),
                           mu=optax.tree.zeros_like(params),
                           hessian=optax.tree.zeros_like(params))

    def fold(hessian, estimate):
        new = optax.tree.update_moment(estimate, hessian, b2, 1)
        return optax.tree.cast_like(new, hessian)

    def update_fn(updates, state, params=None, hessian_diag=None, hessian_fn=None,
                  **extra_args):
        del extra_args
        if hessian_diag is not None and hessian_fn is not None:
            raise ValueError("give sophia's update hessian_diag or hessian_fn, not both")
        hessian = state.hessian
        if hessian_diag is not None:
            hessian = fold(hessian, hessian_diag)
        elif hessian_fn is not None:
            if params is None:
                raise ValueError("sophia's update needs params to call hessian_fn")
            hessian = jax.lax.cond(state.count % hessian_every == 0,
                                   lambda h: fold(h, hessian_fn(params)), lambda h: h,
                                   hessian)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)

        def direction(m, h):
            ratio = jnp.abs(m) / (rho * jnp.maximum(h, 0) + eps)
            return jnp.sign(m) * jnp.minimum(ratio, 1)

        updates = jax.tree.map(direction, mu, hessian)
        return updates, SophiaState(optax.safe_increment(state.count),
                                    optax.tree.cast_like(mu, state.mu), hessian)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia(learning_rate, b1=0.965, b2=0.99, rho=0.04, eps=1e-15, weight_decay=0.1,
           hessian_every=10, estimator="gnb", mask=None, weight_decay_mode="lr_scaled"):
    """Sophia (Liu et al., 2023): clipped, diagonally preconditioned momentum; see the module.

    Args:
      learning_rate: a float or a schedule `step -> lr` (the official code: 1e-4 peak for
        GPT-2 small with rho=0.05, weight_decay=0.2).
      b1, b2, rho, eps, hessian_every: see `scale_by_sophia`.
      weight_decay: decoupled decay times lr, as the official `param.mul_(1 - lr * wd)`;
        mask: which leaves are decayed.
      estimator: "gnb" (Sophia-G) or "hutchinson" (Sophia-H): which estimator the training
        loop should feed (`optim.sophia_estimates`); the transform itself takes any.
      weight_decay_mode: "lr_scaled" (`w -= lr_t * wd * w`) or "independent"
        (`w -= s_t * wd * w`, s_t = lr_t / peak lr); see `optim.decay_and_scale`.

    Returns:
      An `optax.GradientTransformationExtraArgs` taking `hessian_diag=` / `hessian_fn=`.

    References:
      https://arxiv.org/abs/2305.14342; https://github.com/Liuhong99/Sophia

    Example:
      >>> tx = sophia(1e-4)
      >>> fn = lambda p: sophia_estimates.gnb(logits_fn, p, inputs, key)
      >>> updates, state = tx.update(grads, state, params, hessian_fn=fn)
    """
    _validate.one_of("estimator", estimator, ESTIMATORS)
    return optax.chain(scale_by_sophia(b1, b2, rho, eps, hessian_every),
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
