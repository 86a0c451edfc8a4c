"""Learning-rate schedules: callables `step -> lr`.

Every schedule is a pure function of the step, built from static hyperparameters checked
at construction. It accepts a python int or an integer array of any shape (the optax step
counter, a vector of steps) and returns float32 learning rates of the same shape, so it can
be jitted, vmapped, passed as an optimizer's `learning_rate` or used with
`optax.inject_hyperparams`.

Notation: `t` is the step, `W` warmup_steps, `T` total_steps. Warmup is linear from
`init_value` (at t = 0) to `peak_value` (at t = W). Schedules with a `total_steps` stay at
their final value for t >= T.

Each schedule carries its `peak_value` as an attribute: optimizers whose
weight decay follows the schedule's shape but not its size (`weight_decay_mode="independent"`)
divide by it to get the multiplier `s_t = lr_t / peak_value`.
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ravine.optim import _validate

DECAY_SHAPES = ("linear", "cosine", "sqrt")


def _progress(t, start, length):
    """Fraction of the interval [start, start + length] done at step t, clipped to [0, 1].

    An empty interval (length 0) counts as done from its start on.
    """
    if length > 0:
        return jnp.clip((t - start) / length, 0.0, 1.0)
    return (t >= start).astype(jnp.float32)


def _interpolate(start_value, end_value, fraction):
    return start_value + (end_value - start_value) * fraction


def _half_cosine(fraction):
    """1 at fraction 0, 0 at fraction 1, following half a cosine period."""
    return 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))


def _with_warmup(after_warmup, init_value, peak_value, warmup_steps):
    """Linear warmup init -> peak over `warmup_steps`, then `after_warmup(t)` (t absolute)."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        lr = after_warmup(t)
        if warmup_steps > 0:
            ramp = _interpolate(init_value, peak_value, _progress(t, 0, warmup_steps))
            lr = jnp.where(t < warmup_steps, ramp, lr)
        return lr

    jitted = jax.jit(schedule)  # one dispatch, not dozens of ops, when called eagerly
    jitted.peak_value = peak_value
    return jitted


def _check_warmup(peak_value, warmup_steps, init_value):
    _validate.non_negative("peak_value", peak_value)
    _validate.non_negative_int("warmup_steps", warmup_steps)
    _validate.non_negative("init_value", init_value)


def _check_horizon(peak_value, total_steps, warmup_steps, init_value, end_value):
    _check_warmup(peak_value, warmup_steps, init_value)
    _validate.positive_int("total_steps", total_steps)
    _validate.non_negative("end_value", end_value)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps must be <= total_steps ({total_steps}), got {warmup_steps!r}")


def constant(value: float) -> optax.Schedule:
    """`lr(t) = value` for every step.

    Args:
      value: the learning rate, a non-negative number.
    """
    _validate.non_negative("value", value)

    def schedule(step):
        return jnp.full(jnp.shape(step), value, jnp.float32)

    schedule.peak_value = value
    return schedule


def linear(peak_value: float, total_steps: int, warmup_steps: int = 0, init_value: float = 0.0,
           end_value: float = 0.0) -> optax.Schedule:
    """Linear warmup, then linear decay: `lr(t) = peak + (end - peak) * (t - W) / (T - W)`.

    Args:
      peak_value: learning rate at the end of warmup.
      total_steps: T, the step at which `end_value` is reached (kept afterwards).
      warmup_steps: W, length of the linear warmup from `init_value`.
      init_value: learning rate at step 0 when W > 0.
      end_value: learning rate from step T on.
    """
    _check_horizon(peak_value, total_steps, warmup_steps, init_value, end_value)

    def decay(t):
        fraction = _progress(t, warmup_steps, total_steps - warmup_steps)
        return _interpolate(peak_value, end_value, fraction)

    return _with_warmup(decay, init_value, peak_value, warmup_steps)


def warmup_cosine(peak_value: float, total_steps: int, warmup_steps: int = 0,
                  init_value: float = 0.0, end_value: Optional[float] = None) -> optax.Schedule:
    """Linear warmup, then half-cosine decay (Loshchilov & Hutter, 2017, "SGDR", one period).

    `lr(t) = end + (peak - end) * 0.5 * (1 + cos(pi * (t - W) / (T - W)))` for W <= t <= T.
    Equals `optax.warmup_cosine_decay_schedule(init_value, peak_value, W, T, end_value)`.

    Args:
      peak_value: learning rate at the end of warmup.
      total_steps: T, the step at which `end_value` is reached (kept afterwards).
      warmup_steps: W, length of the linear warmup from `init_value`.
      init_value: learning rate at step 0 when W > 0.
      end_value: final learning rate; None means 0.1 * peak_value.

    Example:
      >>> from ravine.optim.schedules import warmup_cosine
      >>> lr = warmup_cosine(1.0, total_steps=10, warmup_steps=2)
      >>> print([round(float(lr(t)), 3) for t in (0, 1, 2, 6, 10, 20)])
      [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """
    if end_value is None:
        _validate.non_negative("peak_value", peak_value)
        end_value = 0.1 * peak_value
    _check_horizon(peak_value, total_steps, warmup_steps, init_value, end_value)

    def decay(t):
        fraction = _progress(t, warmup_steps, total_steps - warmup_steps)
        return _interpolate(end_value, peak_value, _half_cosine(fraction))

    return _with_warmup(decay, init_value, peak_value, warmup_steps)


def wsd(peak_value: float, total_steps: int, warmup_steps: int = 0,
        decay_steps: Optional[int] = None, init_value: float = 0.0, end_value: float = 0.0,
        decay_shape: str = "linear") -> optax.Schedule:
    """Warmup-stable-decay (Hu et al., 2024, "MiniCPM"; Hägele et al., 2024, "Scaling Laws
    and Compute-Optimal Training beyond Fixed Training Durations").

    Linear warmup to `peak_value`, flat at the peak until `S = T - decay_steps`, then a
    cooldown to `end_value` at T: with `f = (t - S) / decay_steps`,
    `lr(t) = end + (peak - end) * g(f)` where `g(f)` is `1 - f` ("linear"),
    `0.5 * (1 + cos(pi * f))` ("cosine") or `1 - sqrt(f)` ("sqrt", Hägele et al.'s 1-sqrt).

    Args:
      peak_value: learning rate of the stable phase.
      total_steps: T, the step at which `end_value` is reached (kept afterwards).
      warmup_steps: W, length of the linear warmup from `init_value`.
      decay_steps: length of the cooldown, at most T - W; None means 0.2 * T (rounded down,
        and shortened to T - W if the warmup leaves less room).
      init_value: learning rate at step 0 when W > 0.
      end_value: learning rate from step T on.
      decay_shape: "linear", "cosine" or "sqrt".
    """
    _check_horizon(peak_value, total_steps, warmup_steps, init_value, end_value)
    _validate.one_of("decay_shape", decay_shape, DECAY_SHAPES)
    if decay_steps is None:
        decay_steps = min(total_steps // 5, total_steps - warmup_steps)
    _validate.non_negative_int("decay_steps", decay_steps)
    if decay_steps > total_steps - warmup_steps:
        raise ValueError(f"decay_steps must be <= total_steps - warmup_steps "
                         f"({total_steps - warmup_steps}), got {decay_steps!r}")
    shape = {"linear": lambda f: 1.0 - f,
             "cosine": _half_cosine,
             "sqrt": lambda f: 1.0 - jnp.sqrt(f)}[decay_shape]

    def stable_then_decay(t):
        fraction = _progress(t, total_steps - decay_steps, decay_steps)
        return _interpolate(end_value, peak_value, shape(fraction))

    return _with_warmup(stable_then_decay, init_value, peak_value, warmup_steps)


def _integer_power(base, exponent, bits):
    """`base ** exponent` for int32 `exponent` in [0, 2**bits), by repeated squaring.

    Exact whenever the result is representable (an integer base below 2**24), on every
    backend; XLA's `pow` computes exp(y * log(x)) on some and misses integer boundaries.
    """
    result = jnp.ones(jnp.shape(exponent), jnp.float32)
    square = jnp.float32(base)
    for bit in range(bits):
        result = jnp.where(((exponent >> bit) & 1) == 1, result * square, result)
        square = square * square
    return result


def cosine_restarts(peak_value: float, first_period: int, period_mult: float = 1.0,
                    end_value: float = 0.0, warmup_steps: int = 0,
                    init_value: float = 0.0) -> optax.Schedule:
    """Cosine annealing with warm restarts (Loshchilov & Hutter, 2017, "SGDR").

    After the warmup, period i lasts `P_i = first_period * period_mult**i` steps; within it,
    `lr = end + (peak - end) * 0.5 * (1 + cos(pi * tau / P_i))` where tau counts the steps
    since the period began, and the next period restarts at `peak_value`. Never ends.
    Period boundaries are exact for an integer `period_mult` (below 2**24 steps).

    Args:
      peak_value: learning rate at the start of each period.
      first_period: length of period 0 in steps (>= 1).
      period_mult: growth factor of the period length (>= 1; SGDR's T_mult).
      end_value: learning rate approached at the end of each period.
      warmup_steps: W, length of the linear warmup before period 0.
      init_value: learning rate at step 0 when W > 0.
    """
    _check_warmup(peak_value, warmup_steps, init_value)
    _validate.positive_int("first_period", first_period)
    _validate.in_range("period_mult", period_mult, 1.0, math.inf)
    _validate.non_negative("end_value", end_value)
    multiplier = float(np.float32(period_mult))  # the value the float32 schedule computes with
    if multiplier == 1.0:
        def period_start(index):
            return first_period * index.astype(jnp.float32)

        def estimate_index(since):
            return since / first_period
    else:
        # Enough exponent bits for any int32 step (and the +1 of the next period).
        max_index = math.log1p(2.0 ** 31 * (multiplier - 1) / first_period) / math.log(multiplier)
        bits = (int(max_index) + 2).bit_length()

        def period_start(index):
            power = _integer_power(multiplier, index, bits)
            return first_period * (power - 1.0) / (jnp.float32(multiplier) - 1.0)

        def estimate_index(since):
            return jnp.log1p(since * (multiplier - 1) / first_period) / math.log(multiplier)

    def restarts(t):
        since = jnp.maximum(t - warmup_steps, 0.0)
        # The float estimate can be one period off next to a boundary; the exact boundary
        # comparisons fix it.
        index = jnp.floor(estimate_index(since)).astype(jnp.int32)
        index = index + (since >= period_start(index + 1)) - (since < period_start(index))
        start = period_start(index)
        length = period_start(index + 1) - start
        return _interpolate(end_value, peak_value, _half_cosine((since - start) / length))

    return _with_warmup(restarts, init_value, peak_value, warmup_steps)


def inverse_sqrt(peak_value: float, warmup_steps: int,
                 init_value: float = 0.0) -> optax.Schedule:
    """Linear warmup, then inverse square-root decay (Vaswani et al., 2017, "Attention Is
    All You Need"): `lr(t) = peak * sqrt(W / t)` for t >= W.

    Args:
      peak_value: learning rate at the end of warmup (t = W).
      warmup_steps: W >= 1; also sets the decay's time scale.
      init_value: learning rate at step 0.
    """
    _check_warmup(peak_value, warmup_steps, init_value)
    _validate.positive_int("warmup_steps", warmup_steps)

    def decay(t):
        return peak_value * jnp.sqrt(warmup_steps / jnp.maximum(t, warmup_steps))

    return _with_warmup(decay, init_value, peak_value, warmup_steps)
