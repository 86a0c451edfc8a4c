"""First-order scalings: momentum, AdaGrad, RMSProp, Adam, Lion and Adafactor.

Each `scale_by_*` is an `optax.GradientTransformation` that turns gradients into a direction
(no learning rate, no sign flip, no weight decay: `optim.alias` chains those on). States are
NamedTuples; their arrays keep the dtype they were created with (the params' dtype unless an
explicit `*_dtype` is given), so a bf16 model keeps bf16 moments and jit never re-traces.

Complex parameters: second moments are moments of `|g|^2 = conj(g) g` (optax's convention),
so every transform here gives `optax`'s numbers on complex gradients. The moment updates and
bias corrections are optax's public tree helpers (`optax.tree.update_moment`,
`update_moment_per_elem_norm`, `bias_correction`).
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate


def _cast_like(tree, like):
    """Casts each leaf of `tree` to the dtype of the matching leaf of `like` (the old state)."""
    return optax.tree.cast_like(tree, like)


def _abs_sq(x):
    """`|x|^2 = conj(x) x` (real); `x * x` for real x, as optax squares complex gradients."""
    return (jnp.conj(x) * x).real


def _ema(new, old, decay):
    """Exponential moving average `decay * old + (1 - decay) * new`."""
    return (1 - decay) * new + decay * old


def _debiased(moment, decay, count):
    """`moment / (1 - decay**count)`, the power taken in float32.

    `optax.inject_hyperparams` hands `decay` over in the params' dtype: in bfloat16,
    `1 - 0.999**t` rounds to 0 for small t, so the decay is widened before the power.
    """
    return optax.tree.bias_correction(moment, jnp.asarray(decay, jnp.float32), count)


def _rms(x):
    return jnp.sqrt(jnp.mean(_abs_sq(x)))


class MomentumState(NamedTuple):
    trace: optax.Updates  # the momentum buffer (optax.trace's field name)


def scale_by_momentum(decay: float = 0.9, nesterov: bool = False,
                      accumulator_dtype: Optional[Any] = None) -> optax.GradientTransformation:
    """Heavy-ball momentum, optionally Nesterov's (`optax.trace` semantics).

    `m_t = g_t + decay * m_{t-1}`; the update is `m_t`, or `g_t + decay * m_t` with Nesterov
    (no `1 - decay` damping on the gradient).

    Args:
      decay: momentum coefficient in [0, 1).
      nesterov: use the Nesterov look-ahead form.
      accumulator_dtype: dtype of `m` (default: the params' dtype).

    Returns:
      An `optax.GradientTransformation` whose state is a `MomentumState`.

    References:
      Polyak, `Some methods of speeding up the convergence of iteration methods
      <https://doi.org/10.1016/0041-5553(64)90137-5>`_, 1964.

      Sutskever et al., `On the importance of initialization and momentum in deep learning
      <https://proceedings.mlr.press/v28/sutskever13.html>`_, 2013.
    """
    _validate.in_range("decay", decay)
    accumulator_dtype = _validate.state_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        return MomentumState(optax.tree.zeros_like(params, dtype=accumulator_dtype))

    def update_fn(updates, state, params=None):
        del params
        momentum = jax.tree.map(lambda g, m: g + decay * m, updates, state.trace)
        if nesterov:
            updates = jax.tree.map(lambda g, m: g + decay * m, updates, momentum)
        else:
            updates = momentum
        return updates, MomentumState(_cast_like(momentum, state.trace))

    return optax.GradientTransformation(init_fn, update_fn)


class AdagradState(NamedTuple):
    sum_of_squares: optax.Updates


def scale_by_adagrad(initial_accumulator_value: float = 0.1,
                     eps: float = 1e-7) -> optax.GradientTransformation:
    """AdaGrad: divide by the root of all squared gradients so far (`optax.scale_by_rss`).

    `s_t = s_{t-1} + |g_t|^2` (with `s_0 = initial_accumulator_value`);
    update `g_t / sqrt(s_t + eps)`, and 0 where `s_t == 0`.

    Args:
      initial_accumulator_value: starting value of the sum, >= 0.
      eps: added inside the root, >= 0.

    Returns:
      An `optax.GradientTransformation` whose state is an `AdagradState`.

    References:
      Duchi et al., `Adaptive Subgradient Methods for Online Learning and Stochastic
      Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.
    """
    _validate.non_negative("initial_accumulator_value", initial_accumulator_value)
    _validate.non_negative("eps", eps)

    def init_fn(params):
        return AdagradState(optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(updates, state, params=None):
        del params
        sums = jax.tree.map(lambda g, s: s + _abs_sq(g), updates, state.sum_of_squares)
        updates = jax.tree.map(
            lambda g, s: jnp.where(s > 0, g * jax.lax.rsqrt(s + eps), 0), updates, sums)
        return updates, AdagradState(_cast_like(sums, state.sum_of_squares))

    return optax.GradientTransformation(init_fn, update_fn)


class RmsState(NamedTuple):
    nu: optax.Updates
    mu: Any = None  # first moment, kept when centered
    count: Any = None  # int32 scalar, kept with bias_correction


def scale_by_rms(decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
                 eps_in_sqrt: bool = True, bias_correction: bool = False,
                 centered: bool = False) -> optax.GradientTransformation:
    """RMSProp's scaling: divide by the RMS (or the standard deviation) of recent gradients.

    `v_t = decay * v_{t-1} + (1 - decay) * |g_t|^2` with `v_0 = initial_scale`; update
    `g_t / sqrt(v_t + eps)` (`g_t / (sqrt(v_t) + eps)` when not `eps_in_sqrt`). Centered
    (Graves 2013) also keeps `m_t`, the EMA of `g`, and divides by `sqrt(v_t - |m_t|^2 + eps)`.
    With `bias_correction`, `m_t` and `v_t` are divided by `1 - decay^t` first. Equals
    `optax.scale_by_rms`, or `optax.scale_by_stddev` when centered.

    Args:
      decay: decay rate of the moving averages, in [0, 1).
      eps: added to the denominator, >= 0.
      initial_scale: initial value of `v`, >= 0.
      eps_in_sqrt: add `eps` inside the root (optax's and TensorFlow's default) or outside
        it (PyTorch's).
      bias_correction: divide the moments by `1 - decay^t` (a step counter in the state).
      centered: divide by the standard deviation instead of the RMS (one more moment).

    Returns:
      An `optax.GradientTransformation` whose state is an `RmsState`.

    References:
      Tieleman & Hinton, `Lecture 6.5: rmsprop
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_, 2012.

      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013.
    """
    _validate.in_range("decay", decay)
    _validate.non_negative("eps", eps)
    _validate.non_negative("initial_scale", initial_scale)

    def init_fn(params):
        return RmsState(nu=optax.tree.full_like(params, initial_scale),
                        mu=optax.tree.zeros_like(params) if centered else None,
                        count=jnp.zeros([], jnp.int32) if bias_correction else None)

    def update_fn(updates, state, params=None):
        del params
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, decay, 2)
        mu = optax.tree.update_moment(updates, state.mu, decay, 1) if centered else None
        count = optax.safe_increment(state.count) if bias_correction else None
        nu_hat = _debiased(nu, decay, count) if bias_correction else nu
        if centered:
            mu_hat = _debiased(mu, decay, count) if bias_correction else mu
            nu_hat = jax.tree.map(lambda n, m: n - _abs_sq(m), nu_hat, mu_hat)
        if eps_in_sqrt:
            scaling = jax.tree.map(lambda n: jax.lax.rsqrt(n + eps), nu_hat)
        else:
            scaling = jax.tree.map(lambda n: 1 / (jnp.sqrt(n) + eps), nu_hat)
        updates = jax.tree.map(lambda s, g: s * g, scaling, updates)
        return updates, RmsState(nu=_cast_like(nu, state.nu),
                                 mu=_cast_like(mu, state.mu) if centered else None,
                                 count=count)

    return optax.GradientTransformation(init_fn, update_fn)


class AdamState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                  mu_dtype: Optional[Any] = None, *,
                  nesterov: bool = False) -> optax.GradientTransformation:
    """Adam's scaling: bias-corrected first moment over the root of the second.

    `m_t = b1 m_{t-1} + (1-b1) g_t`, `v_t = b2 v_{t-1} + (1-b2) |g_t|^2`,
    `m^ = m_t / (1 - b1^t)`, `v^ = v_t / (1 - b2^t)`, update `m^ / (sqrt(v^ + eps_root) + eps)`.
    With `nesterov` (NAdam, Dozat 2016), `m^` is replaced by
    `b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)`. Equals `optax.scale_by_adam`.

    Args:
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: added to the root of the denominator, >= 0.
      eps_root: added inside the root, >= 0 (keeps the gradient of the update finite when
        differentiating through it).
      mu_dtype: dtype of `m` (default: the params' dtype); `v` keeps the params' dtype.
      nesterov: use Nesterov's look-ahead first moment (NAdam).

    Returns:
      An `optax.GradientTransformation` whose state is an `AdamState`.

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015.

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.non_negative("eps_root", eps_root)
    mu_dtype = _validate.state_dtype("mu_dtype", mu_dtype)

    def init_fn(params):
        return AdamState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                         nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        if nesterov:
            mu_hat = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g,
                                  _debiased(mu, b1, optax.safe_increment(count)),
                                  _debiased(updates, b1, count))
        else:
            mu_hat = _debiased(mu, b1, count)
        nu_hat = _debiased(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        return updates, AdamState(count, _cast_like(mu, state.mu), _cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


class LionState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken (as optax's `ScaleByLionState`)
    mu: optax.Updates


def scale_by_lion(b1: float = 0.9, b2: float = 0.99,
                  mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
    """Lion's scaling: the sign of an interpolation of momentum and gradient.

    update `sign(b1 m_{t-1} + (1-b1) g_t)`, then `m_t = b2 m_{t-1} + (1-b2) g_t`.
    One moment, half of Adam's state, plus a step count that the update does not use: optax's
    Lion state has one, and `optax.tree.get(state, "count")` finds it. On complex gradients
    `sign(z)` is `z / |z|`, as in `optax.scale_by_lion`.

    Args:
      b1: interpolation between momentum and gradient for the update, in [0, 1).
      b2: decay rate of the momentum, in [0, 1).
      mu_dtype: dtype of `m` (default: the params' dtype).

    Returns:
      An `optax.GradientTransformation` whose state is a `LionState`.

    References:
      Chen et al., `Symbolic Discovery of Optimization Algorithms
      <https://arxiv.org/abs/2302.06675>`_, 2023.
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    mu_dtype = _validate.state_dtype("mu_dtype", mu_dtype)

    def init_fn(params):
        return LionState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates, state, params=None):
        del params
        directions = jax.tree.map(lambda g, m: jnp.sign(_ema(g, m, b1)), updates, state.mu)
        mu = optax.tree.update_moment(updates, state.mu, b2, 1)
        return directions, LionState(optax.safe_increment(state.count),
                                     _cast_like(mu, state.mu))

    return optax.GradientTransformation(init_fn, update_fn)


class FactoredMoments(NamedTuple):
    """Adafactor's second moment of a factored leaf, as two means of `|g|^2`.

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


def scale_by_adafactor(min_dim_size_to_factor: int = 128, decay_rate: float = 0.8,
                       decay_offset: int = 0, clipping_threshold: Optional[float] = 1.0,
                       multiply_by_parameter_scale: bool = True, eps: float = 1e-30,
                       factored: bool = True) -> optax.GradientTransformation:
    """Adafactor's scaling (no momentum, no learning rate), as in `optax.adafactor`.

    With `b_t = 1 - (t + 1 - decay_offset)^(-decay_rate)` (t counts from 0), the second moment
    of `|g|^2 + eps` is an EMA with decay `b_t`. For a leaf whose two largest dims are both
    >= `min_dim_size_to_factor` it is kept factored (`FactoredMoments`: O(rows + cols) memory)
    and estimated as `outer(row, col) / mean(row)`; otherwise it is kept in full. The update
    `u = g / sqrt(v)` is then clipped to RMS <= `clipping_threshold` (None: no clipping) and,
    with `multiply_by_parameter_scale`, multiplied by `max(RMS(param), 1e-3)`.

    Args:
      min_dim_size_to_factor: factor a leaf only when its two largest dims are at least this
        (a static Python int: it decides the state's shapes).
      decay_rate: exponent of the second moment's decay schedule, >= 0.
      decay_offset: step offset of that schedule, an integer >= 0.
      clipping_threshold: largest RMS of the update (None: no clipping), > 0.
      multiply_by_parameter_scale: scale updates by the RMS of the param (relative step).
      eps: added to `|g|^2`, >= 0.
      factored: whether to factor large leaves at all (optax's `factored`).

    Returns:
      An `optax.GradientTransformation` whose state is an `AdafactorState`.

    References:
      Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
      <https://arxiv.org/abs/1804.04235>`_, 2018.
    """
    _validate.static_int("min_dim_size_to_factor", min_dim_size_to_factor)
    _validate.non_negative("decay_rate", decay_rate)
    _validate.non_negative_int("decay_offset", decay_offset)
    if clipping_threshold is not None:
        _validate.greater_than("clipping_threshold", clipping_threshold, 0)
    _validate.non_negative("eps", eps)
    min_size = min_dim_size_to_factor if factored else float("inf")

    def init_leaf(param):
        dims = _factored_dims(param.shape, min_size)
        if dims is None:
            return jnp.zeros_like(param)
        second, largest = dims
        return FactoredMoments(row=_zeros_without(param, largest),
                               col=_zeros_without(param, second))

    def init_fn(params):
        return AdafactorState(count=jnp.zeros([], jnp.int32),
                              moments=jax.tree.map(init_leaf, params))

    def update_leaf(grad, moment, param, decay):
        squared = _abs_sq(grad) + eps
        if isinstance(moment, FactoredMoments):
            second, largest = _factored_dims(grad.shape, min_size)
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
