"""Schedule-Free AdamW: no learning-rate decay; momentum replaced by interpolation + averaging.

Three sequences: `z` takes the base optimizer's steps (AdamW without momentum), `x` is a
weighted running average of the `z`s, and the gradient is taken at the interpolation
`y = (1 - b1) z + b1 x`. The model's params (what `update` moves) are `y`; evaluate and
checkpoint-for-eval the average `x` (`schedule_free_eval_params`). With step weights
`w_t = max_lr_t ** weight_lr_power`, `c_t = w_t / sum_{s<=t} w_s`:

    z_{t+1} = z_t - lr_t * (g(y_t) / (sqrt(v^_t) + eps) + wd * y_t)
    x_{t+1} = (1 - c_t) x_t + c_t z_{t+1}
    y_{t+1} = (1 - b1) z_{t+1} + b1 x_{t+1}

Only `z` is stored (x is recovered from y and z), so the memory is AdamW's.

References:
  Defazio et al., 2024, "The Road Less Scheduled", https://arxiv.org/abs/2405.15682
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import MaskOrFn, decay_and_scale


class ScheduleFreeState(NamedTuple):
    b1: jax.Array  # the interpolation weight (kept here so eval params need only the state)
    weight_sum: jax.Array  # sum of the averaging weights so far
    step_count: jax.Array  # int32, starts at 1 (the step the lr schedule is read at)
    max_lr: jax.Array  # the largest learning rate seen so far
    base_state: optax.OptState  # the base optimizer's state
    z: optax.Params  # the sequence the base optimizer steps


class RmsBiasCorrectedState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    nu: optax.Updates


def scale_by_bias_corrected_rms(b2: float = 0.999,
                                eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam without momentum: `g / (sqrt(v_t / (1 - b2^t)) + eps)`, `v` the EMA of `g^2`.

    (`optax.scale_by_rms(b2, eps, eps_in_sqrt=False, bias_correction=True)`; Adam with b1=0
    would give the same numbers but store a first moment equal to the gradient.)
    """
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)

    def init_fn(params):
        return RmsBiasCorrectedState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        # Multiplying by the reciprocal (not dividing) rounds as optax does.
        updates = jax.tree.map(lambda g, v: g * (1 / (jnp.sqrt(v) + eps)), updates, nu_hat)
        return updates, RmsBiasCorrectedState(count, optax.tree.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


def schedule_free(base_optimizer: optax.GradientTransformation,
                  learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
                  weight_lr_power: float = 2.0, state_dtype: Optional[Any] = None
                  ) -> optax.GradientTransformationExtraArgs:
    """Makes `base_optimizer` (without momentum, lr included) schedule-free.

    Args:
      base_optimizer: the transform whose steps `z` takes, learning rate included.
      learning_rate: the same learning rate (float or schedule), read at `step_count`
        (1, 2, ...) for the averaging weights, as `optax.contrib.schedule_free`.
      b1: interpolation weight of `x` in `y`, in (0, 1).
      weight_lr_power: averaging weights are `max_lr ** weight_lr_power`.
      state_dtype: dtype of the stored sequence `z` (None: the params' dtypes), as
        `optax.contrib.schedule_free`; e.g. float32 z for bfloat16 params.

    Returns:
      An `optax.GradientTransformationExtraArgs` (extra args go to the base optimizer).
    """
    _validate.in_range("b1", b1)
    if isinstance(b1, (int, float)) and b1 == 0:
        raise ValueError(f"b1 must be in (0, 1) for schedule-free, got {b1!r}")
    _validate.non_negative("weight_lr_power", weight_lr_power)
    state_dtype = _validate.state_dtype("state_dtype", state_dtype)
    base_optimizer = optax.with_extra_args_support(base_optimizer)

    def init_fn(params):
        dtype = optax.tree.dtype(params, "lowest")
        z = params if state_dtype is None else optax.tree.cast(params, state_dtype)
        return ScheduleFreeState(
            b1=jnp.asarray(b1, dtype), weight_sum=jnp.zeros([], dtype),
            step_count=jnp.ones([], jnp.int32), max_lr=jnp.zeros([], dtype),
            base_state=base_optimizer.init(params),
            z=jax.tree.map(jnp.copy, z))  # a buffer of its own: params and state can be donated

    def update_fn(grads, state, params=None, **extra_args):
        if params is None:
            raise ValueError("schedule_free needs params (y) in update")
        lr = learning_rate(state.step_count) if callable(learning_rate) else learning_rate
        max_lr = jnp.maximum(state.max_lr, jnp.asarray(lr, state.max_lr.dtype))
        weight = max_lr ** weight_lr_power
        weight_sum = state.weight_sum + weight
        # 0/0 before the first nonzero lr (warmup from 0) averages nothing in; NaN stays NaN.
        average_weight = jnp.where(weight_sum == 0, 0.0, weight / weight_sum)

        steps, base_state = base_optimizer.update(grads, state.base_state, params,
                                                  **extra_args)
        z = jax.tree.map(lambda z_old, u: (z_old + u).astype(z_old.dtype), state.z, steps)

        def new_y(y, z_old, z_new):
            x_old = (y - (1.0 - b1) * z_old) / b1
            x_new = (1.0 - average_weight) * x_old + average_weight * z_new
            return (b1 * x_new + (1.0 - b1) * z_new - y).astype(y.dtype)

        updates = jax.tree.map(new_y, params, state.z, z)
        return updates, ScheduleFreeState(state.b1, weight_sum,
                                          optax.safe_increment(state.step_count), max_lr,
                                          base_state, z)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _warmup_constant(learning_rate, warmup_steps):
    """`lr * t / warmup_steps` for t < warmup_steps, then `lr` (lr may be a schedule)."""
    def schedule(step):
        peak = learning_rate(step) if callable(learning_rate) else learning_rate
        remaining = 1 - jnp.clip(step, 0, warmup_steps) / warmup_steps
        # peak - peak * remaining, rounded as optax.warmup_constant_schedule rounds it.
        return -peak * remaining + peak

    peak_value = getattr(learning_rate, "peak_value", learning_rate)
    if not callable(peak_value):
        schedule.peak_value = peak_value  # for weight_decay_mode="independent"
    return schedule


def schedule_free_adamw(learning_rate: optax.ScalarOrSchedule,
                        warmup_steps: Optional[int] = None, b1: float = 0.9,
                        b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                        weight_lr_power: float = 2.0, mask: MaskOrFn = None,
                        weight_decay_mode: str = "lr_scaled", state_dtype: Optional[Any] = None
                        ) -> optax.GradientTransformationExtraArgs:
    """Schedule-Free AdamW (Defazio et al., 2024): AdamW without momentum, made schedule-free.

    Same numbers as `optax.contrib.schedule_free_adamw` (which has no `mask`). Use a constant
    learning rate with this optimizer's own `warmup_steps`, and evaluate at
    `schedule_free_eval_params(state, params)`.

    Args:
      learning_rate: peak learning rate (a float; a schedule is multiplied by the warmup).
      warmup_steps: None, or linear warmup from 0 over this many steps.
      b1: interpolation weight of the average `x` in the gradient point `y`, in (0, 1).
      b2, eps: the second moment's decay and the denominator's epsilon (bias-corrected).
      weight_decay: decoupled weight decay (times lr), taken at `y`; mask: which leaves.
      weight_lr_power: averaging weights are `max_lr ** weight_lr_power`.
      weight_decay_mode: "lr_scaled" (`w -= lr_t * wd * w`) or "independent"
        (`w -= s_t * wd * w`, s_t = lr_t / peak lr); see `optim.decay_and_scale`.
      state_dtype: dtype of the stored `z` (None: the params' dtypes), as optax.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    References:
      https://arxiv.org/abs/2405.15682

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine.optim.schedule_free import schedule_free_adamw, schedule_free_eval_params
      >>> def f(x): return jnp.sum(x ** 2)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> tx = schedule_free_adamw(0.1, warmup_steps=2)
      >>> state = tx.init(params)
      >>> for _ in range(5):  # train: updates, state = tx.update(grads, state, params)
      ...   updates, state = tx.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> eval_params = schedule_free_eval_params(state, params)
      >>> print(f"{f(params):.3f} {f(eval_params):.3f}")
      11.716 11.885
    """
    _validate.learning_rate(learning_rate)
    if warmup_steps is not None:
        _validate.positive_int("warmup_steps", warmup_steps)
        learning_rate = _warmup_constant(learning_rate, warmup_steps)
    base = optax.chain(scale_by_bias_corrected_rms(b2, eps),
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
    return schedule_free(base, learning_rate, b1, weight_lr_power, state_dtype)


def _is_schedule_free_state(node):
    return isinstance(node, ScheduleFreeState)


def schedule_free_eval_params(state: optax.OptState, params: optax.Params) -> optax.Params:
    """The averaged params `x = (y - (1 - b1) z) / b1` to evaluate a schedule-free model at.

    Args:
      state: the optimizer state, or any pytree holding exactly one `ScheduleFreeState`
        (e.g. under `optax.chain`, `optax.inject_hyperparams` or clipping).
      params: the current params `y`.

    Returns:
      A tree like `params`. Raises ValueError if `state` holds no (or several)
      schedule-free states.
    """
    found = [node for node in jax.tree.leaves(state, is_leaf=_is_schedule_free_state)
             if _is_schedule_free_state(node)]
    if len(found) != 1:
        raise ValueError(f"schedule_free_eval_params needs a state holding one "
                         f"ScheduleFreeState, found {len(found)}")
    sf = found[0]
    return jax.tree.map(
        lambda y, z: ((y - (1.0 - sf.b1) * z) / sf.b1).astype(y.dtype), params, sf.z)
