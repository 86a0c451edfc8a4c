"""First-order scalings: momentum, AdaGrad, RMSProp, Adam, Lion and Adafactor.

Each `scale_by_*` is an `optax.GradientTransformation` that turns gradients into a direction
(no learning rate, no sign flip, no weight decay: `optim.alias` chains those on). States are
NamedTuples; their arrays keep the dtype they were created with (the params' dtype unless an
explicit `*_dtype` is given), so a bf16 model keeps bf16 moments and jit never re-traces.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _validate


def _cast_like(tree, like):
    """Casts each leaf of `tree` to the dtype of the matching leaf of `like` (the old state)."""
    return optax.tree.cast_like(tree, like)


def _ema(new, old, decay):
    """Exponential moving average `decay * old + (1 - decay) * new`."""
    return (1 - decay) * new + decay * old


def _bias_correction(decay, count):
    """`1 - decay**count`: the weight an EMA started at zero has put on the data (float32)."""
    return 1 - jnp.asarray(decay, jnp.float32) ** count.astype(jnp.float32)


def _rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x)))


class MomentumState(NamedTuple):
    momentum: optax.Updates


def scale_by_momentum(decay=0.9, nesterov=False, accumulator_dtype=None):
    """Heavy-ball momentum (Polyak, 1964), optionally Nesterov's (Sutskever et al., 2013).

    `m_t = g_t + decay * m_{t-1}`; the update is `m_t`, or `g_t + decay * m_t` with Nesterov.
    These are `optax.trace` semantics (no `1 - decay` damping on the gradient).

    Args:
      decay: momentum coefficient in [0, 1).
      nesterov: use the Nesterov look-ahead form.
      accumulator_dtype: dtype of `m` (default: the params' dtype).
    """
    _validate.in_range("decay", decay)

    def init_fn(params):
        return MomentumState(optax.tree.zeros_like(params, dtype=accumulator_dtype))

    def update_fn(updates, state, params=None):
        del params
        momentum = jax.tree.map(lambda g, m: g + decay * m, updates, state.momentum)
        if nesterov:
            updates = jax.tree.map(lambda g, m: g + decay * m, updates, momentum)
        else:
            updates = momentum
        return updates, MomentumState(_cast_like(momentum, state.momentum))

    return optax.GradientTransformation(init_fn, update_fn)


class AdagradState(NamedTuple):
    sum_of_squares: optax.Updates


def scale_by_adagrad(initial_accumulator_value=0.1, eps=1e-7):
    """AdaGrad (Duchi, Hazan & Singer, 2011): divide by the root of all squared gradients so far.

    `s_t = s_{t-1} + g_t^2` (with `s_0 = initial_accumulator_value`);
    update `g_t / sqrt(s_t + eps)`, and 0 where `s_t == 0`.
    """
    _validate.non_negative("initial_accumulator_value", initial_accumulator_value)
    _validate.non_negative("eps", eps)

    def init_fn(params):
        return AdagradState(optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(updates, state, params=None):
        del params
        sums = jax.tree.map(lambda g, s: s + jnp.square(g), updates, state.sum_of_squares)
        updates = jax.tree.map(
            lambda g, s: jnp.where(s > 0, g * jax.lax.rsqrt(s + eps), 0), updates, sums)
        return updates, AdagradState(_cast_like(sums, state.sum_of_squares))

    return optax.GradientTransformation(init_fn, update_fn)


class RmsState(NamedTuple):
    nu: optax.Updates


def scale_by_rms(decay=0.9, eps=1e-8, initial_scale=0.0):
    """RMSProp (Tieleman & Hinton, 2012, Coursera lecture 6.5): divide by the RMS of recent grads.

    `v_t = decay * v_{t-1} + (1 - decay) * g_t^2` with `v_0 = initial_scale`;
    update `g_t / sqrt(v_t + eps)` (eps inside the root, no bias correction, as `optax.rmsprop`).
    """
    _validate.in_range("decay", decay)
    _validate.non_negative("eps", eps)
    _validate.non_negative("initial_scale", initial_scale)

    def init_fn(params):
        return RmsState(optax.tree.full_like(params, initial_scale))

    def update_fn(updates, state, params=None):
        del params
        nu = jax.tree.map(lambda g, v: _ema(jnp.square(g), v, decay), updates, state.nu)
        updates = jax.tree.map(lambda g, v: g * jax.lax.rsqrt(v + eps), updates, nu)
        return updates, RmsState(_cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


class AdamState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None):
    """Adam (Kingma & Ba, 2015): bias-corrected first moment over the root of the second.

    `m_t = b1 m_{t-1} + (1-b1) g_t`, `v_t = b2 v_{t-1} + (1-b2) g_t^2`,
    `m^ = m_t / (1 - b1^t)`, `v^ = v_t / (1 - b2^t)`, update `m^ / (sqrt(v^ + eps_root) + eps)`.

    Args:
      b1, b2: decay rates of the first and second moments, in [0, 1).
      eps: added to the root of the denominator; eps_root: added inside the root
        (keeps the gradient of the update finite when differentiating through it).
      mu_dtype: dtype of `m` (default: the params' dtype); `v` keeps the params' dtype.
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.non_negative("eps_root", eps_root)

    def init_fn(params):
        return AdamState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                         nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: _ema(g, m, b1), updates, state.mu)
        nu = jax.tree.map(lambda g, v: _ema(jnp.square(g), v, b2), updates, state.nu)
        count = optax.safe_increment(state.count)
        correction1, correction2 = _bias_correction(b1, count), _bias_correction(b2, count)

        def direction(m, v):
            m_hat = m / correction1.astype(m.dtype)
            v_hat = v / correction2.astype(v.dtype)
            return m_hat / (jnp.sqrt(v_hat + eps_root) + eps)

        updates = jax.tree.map(direction, mu, nu)
        return updates, AdamState(count, _cast_like(mu, state.mu), _cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


class LionState(NamedTuple):
    mu: optax.Updates


def scale_by_lion(b1=0.9, b2=0.99, mu_dtype=None):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    update `sign(b1 m_{t-1} + (1-b1) g_t)`, then `m_t = b2 m_{t-1} + (1-b2) g_t`.
    One moment and no step counter: half of Adam's state.

    Args:
      b1: interpolation between momentum and gradient for the update, in [0, 1).
      b2: decay rate of the momentum, in [0, 1).
      mu_dtype: dtype of `m` (default: the params' dtype).
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)

    def init_fn(params):
        return LionState(optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates, state, params=None):
        del params
        directions = jax.tree.map(lambda g, m: jnp.sign(_ema(g, m, b1)), updates, state.mu)
        mu = jax.tree.map(lambda g, m: _ema(g, m, b2), updates, state.mu)
        return directions, LionState(_cast_like(mu, state.mu))

    return optax.GradientTransformation(init_fn, update_fn)


class FactoredMoments(NamedTuple):
    """Adafactor's second moment of a factored leaf, as two means of `g^2`.

    `row` averages over the largest dim, `col` over the second largest; the full moment is
    estimated as `outer(row, col) / mean(row)` (rank one).
    """
    row: jax.Array
    col: jax.Array


class AdafactorState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    moments: Any  # per leaf: FactoredMoments, or the full second moment (same shape as the leaf)


def _factored_dims(shape, min_dim_size_to_factor):
    """(second largest dim, largest dim) when both are >= min_dim_size_to_factor, else None."""
    if len(shape) < 2:
        return None
    by_size = sorted(range(len(shape)), key=lambda d: shape[d])  # stable: ties keep dim order
    second, largest = by_size[-2], by_size[-1]
    if shape[second] < min_dim_size_to_factor:
        return None
    return second, largest


def _zeros_without(param, axis):
    """Zeros shaped like `param` reduced over `axis` (sharded as that reduction would be)."""
    return jnp.zeros_like(jax.eval_shape(lambda p: jnp.mean(p, axis=axis), param))


def scale_by_adafactor(min_dim_size_to_factor=128, decay_rate=0.8, decay_offset=0,
                       clipping_threshold=1.0, multiply_by_parameter_scale=True, eps=1e-30):
    """Adafactor (Shazeer & Stern, 2018) without momentum, as `optax.adafactor`.

    With `b_t = 1 - (t + 1 - decay_offset)^(-decay_rate)` (t counts from 0), the second moment
    of `g^2 + eps` is an EMA with decay `b_t`. For a leaf whose two largest dims are both
    >= `min_dim_size_to_factor` it is kept factored (`FactoredMoments`: O(rows + cols) memory)
    and estimated as `outer(row, col) / mean(row)`; otherwise it is kept in full. The update
    `u = g / sqrt(v)` is then clipped to RMS <= `clipping_threshold` (None: no clipping) and,
    with `multiply_by_parameter_scale`, multiplied by `max(RMS(param), 1e-3)`.
    """
    _validate.positive_int("min_dim_size_to_factor", min_dim_size_to_factor)
    _validate.non_negative("decay_rate", decay_rate)
    _validate.non_negative_int("decay_offset", decay_offset)
    if clipping_threshold is not None:
        _validate.greater_than("clipping_threshold", clipping_threshold, 0)
    _validate.non_negative("eps", eps)

    def init_leaf(param):
        dims = _factored_dims(param.shape, min_dim_size_to_factor)
        if dims is None:
            return jnp.zeros_like(param)
        second, largest = dims
        return FactoredMoments(row=_zeros_without(param, largest),
                               col=_zeros_without(param, second))

    def init_fn(params):
        return AdafactorState(count=jnp.zeros([], jnp.int32),
                              moments=jax.tree.map(init_leaf, params))

    def update_leaf(grad, moment, param, decay):
        squared = jnp.square(grad) + eps
        if isinstance(moment, FactoredMoments):
            second, largest = _factored_dims(grad.shape, min_dim_size_to_factor)
            row = _ema(jnp.mean(squared, axis=largest), moment.row, decay).astype(moment.row.dtype)
            col = _ema(jnp.mean(squared, axis=second), moment.col, decay).astype(moment.col.dtype)
            # `row` lost the largest dim, so the second largest sits one lower when after it.
            row_axis = second - 1 if second > largest else second
            row_mean = jnp.mean(row, axis=row_axis, keepdims=True)
            update = (grad * jnp.expand_dims(jax.lax.rsqrt(row / row_mean), largest)
                      * jnp.expand_dims(jax.lax.rsqrt(col), second))
            moment = FactoredMoments(row, col)
        else:
            moment = _ema(squared, moment, decay).astype(moment.dtype)
            update = grad * jax.lax.rsqrt(moment)
        if clipping_threshold is not None:
            update = update / jnp.maximum(1.0, _rms(update) / clipping_threshold)
        if multiply_by_parameter_scale:
            update = update * optax.safe_root_mean_squares(param, 1e-3)
        return update, moment

    def update_fn(updates, state, params):
        if params is None:
            if multiply_by_parameter_scale:
                raise ValueError("scale_by_adafactor needs params to scale updates by their RMS")
            params = updates  # only their structure is used below
        step = (state.count - decay_offset + 1).astype(jnp.float32)
        decay = 1.0 - step ** (-decay_rate)
        both = jax.tree.map(lambda g, v, p: update_leaf(g, v, p, decay),
                            updates, state.moments, params)
        # `both` holds an (update, moment) pair where `updates` holds a leaf: split it there.
        new_updates = jax.tree.map(lambda _, pair: pair[0], updates, both)
        moments = jax.tree.map(lambda _, pair: pair[1], updates, both)
        return new_updates, AdafactorState(optax.safe_increment(state.count), moments)

    return optax.GradientTransformation(init_fn, update_fn)
