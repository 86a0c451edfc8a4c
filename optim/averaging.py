"""Weight averaging of parameters, as pure functions of pytrees.

Averages of the iterates often generalise and evaluate better than the last iterate
(Polyak & Juditsky, 1992, "Acceleration of Stochastic Approximation by Averaging";
Izmailov et al., 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization", SWA). Two kinds are provided, both kept in float32 (or wider) whatever the
params dtype, so that bfloat16 params do not round the small increments away:

    ema = init_average(params)                      # exponential moving average
    ema = ema_params(ema, params, decay=0.999)      # after each step

    tail = init_tail_average(params)                # uniform average from some step on
    tail = update_tail_average(tail, params, active=step >= average_from_step)

All functions are elementwise, so under jit the averages keep the params' shardings.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate


def _average_dtype(*dtypes):
    """The dtype an average is kept in: the inputs' common dtype, at least float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _mix(average, params, weight):
    """`(1 - weight) * average + weight * params` leafwise, in at least float32.

    Written as a weighted sum (not `average + weight * (params - average)`) so that weight 0
    and 1 return exactly `average` and `params`.
    """

    def mix(avg, param):
        dtype = _average_dtype(avg, param)
        w = weight.astype(dtype)
        return (1 - w) * jnp.asarray(avg, dtype) + w * jnp.asarray(param, dtype)

    return jax.tree.map(mix, average, params)


def init_average(params: optax.Params) -> optax.Params:
    """A copy of `params` in at least float32: the starting point of an average.

    Always a fresh buffer, so donating `params` to a train step leaves the average intact.
    """
    return jax.tree.map(lambda p: jnp.array(p, _average_dtype(p), copy=True), params)


def ema_params(ema: optax.Params, params: optax.Params,
               decay: jax.typing.ArrayLike) -> optax.Params:
    """One step of the exponential moving average `ema <- decay * ema + (1 - decay) * params`.

    Args:
      ema: the current average (e.g. from `init_average`), a pytree like `params`.
      params: the current parameters, any floating dtype.
      decay: in [0, 1]; a python number or a scalar array (e.g. a warmed-up decay).

    Returns:
      The new average, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from ravine.optim.averaging import ema_params, init_average
      >>> ema = init_average({"w": jnp.array([0.0, 2.0], jnp.bfloat16)})
      >>> ema = ema_params(ema, {"w": jnp.array([1.0, 1.0], jnp.bfloat16)}, decay=0.75)
      >>> ema["w"].dtype, ema["w"].tolist()
      (dtype('float32'), [0.25, 1.75])
    """
    if isinstance(decay, (int, float)):
        _validate.in_range("decay", decay, 0.0, 1.0, high_inclusive=True)
    return _mix(ema, params, jnp.asarray(1.0 - decay, jnp.float32))


def tail_average(avg: optax.Params, params: optax.Params,
                 count: jax.typing.ArrayLike) -> optax.Params:
    """Adds `params` to a uniform running average of `count` iterates:
    `avg <- avg + (params - avg) / (count + 1)` (Polyak–Juditsky averaging, SWA).

    Args:
      avg: the mean of the previous `count` iterates (any finite values when count == 0).
      params: the new iterate.
      count: how many iterates `avg` holds; a python int or an integer scalar array.

    Returns:
      The mean of the `count + 1` iterates, in at least float32.
    """
    return _mix(avg, params, 1.0 / (jnp.asarray(count, jnp.float32) + 1.0))


class TailAverage(NamedTuple):
    """A uniform running average of the iterates and how many it holds."""
    average: Any
    count: jax.Array


def init_tail_average(params: optax.Params) -> TailAverage:
    """An empty tail average (count 0) shaped like `params`."""
    return TailAverage(average=init_average(params), count=jnp.zeros((), jnp.int32))


def update_tail_average(state: TailAverage, params: optax.Params,
                        active: jax.typing.ArrayLike = True) -> TailAverage:
    """Adds `params` to the tail average when `active` (a bool or scalar bool array).

    Pass `active = step >= average_from_step` to average only the tail of training;
    while inactive the state is returned unchanged, without a host sync.
    """
    new = TailAverage(average=tail_average(state.average, params, state.count),
                      count=state.count + 1)
    if active is True:
        return new
    return optax.tree.where(active, new, state)
