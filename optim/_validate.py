"""Eager hyperparameter checks shared by every optimizer: ValueError naming the argument."""
import functools
import inspect
import math
from typing import Any, Collection, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _accepts_injected(check):
    """Lets `check` take hyperparameters as `optax.inject_hyperparams` passes them: 0-d arrays.

    A concrete 0-d array is checked as the Python number it holds; a traced one (inside jit)
    cannot be checked and passes (`inject_hyperparams` builds the optimizer again every step).
    """
    signature = inspect.signature(check)

    @functools.wraps(check)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        value = bound.arguments["value"]
        if isinstance(value, jax.core.Tracer):
            return None
        if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
            bound.arguments["value"] = np.asarray(value).item()
        return check(*bound.args, **bound.kwargs)

    return checked


@_accepts_injected
def learning_rate(value: Any, name: str = "learning_rate") -> None:
    """A learning rate is a non-negative finite number or a schedule (callable)."""
    if callable(value):
        return
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number or a schedule, got {value!r}")


@_accepts_injected
def in_range(name: str, value: Any, low: float = 0.0, high: float = 1.0,
             high_inclusive: bool = False) -> None:
    """`low <= value < high` (or `<= high` when high_inclusive)."""
    ok = _is_number(value) and low <= value and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


@_accepts_injected
def non_negative(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


@_accepts_injected
def positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@_accepts_injected
def non_negative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


@_accepts_injected
def one_of(name: str, value: Any, choices: Collection[Any]) -> None:
    """`value` is one of `choices`; a `range` of choices is named by its ends ("0-255")."""
    if value not in choices:
        listed = (f"{choices.start}-{choices[-1]}" if isinstance(choices, range)
                  and choices.step == 1 and len(choices) else list(choices))
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")


@_accepts_injected
def greater_than(name: str, value: Any, bound: float) -> None:
    """A finite number strictly above `bound` (e.g. a loss scale > 0, a growth factor > 1)."""
    if not _is_number(value) or not math.isfinite(value) or value <= bound:
        raise ValueError(f"{name} must be a finite number > {bound}, got {value!r}")


def static_int(name: str, value: Any, low: int = 1) -> int:
    """A Python int >= `low` that shapes the optimizer (state shapes, which leaves are factored).

    Such an argument cannot be a traced array: `optax.inject_hyperparams` turns every number
    into one unless it is listed in `static_args`, and the error says so instead of failing
    later on a comparison with a tracer.
    """
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        raise ValueError(f"{name} must be a static Python int (it sets the optimizer's "
                         f"structure), got an array; with optax.inject_hyperparams pass "
                         f"static_args=({name!r},)")
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def state_dtype(name: str, value: Any) -> Optional[np.dtype]:
    """None (the params' dtype) or a floating or complex dtype for an optimizer state;
    returns None or the canonical numpy dtype (float64 becomes float32 without x64, as optax).
    """
    if value is None:
        return None
    if isinstance(value, (jax.Array, np.ndarray)):
        raise ValueError(f"{name} must be a dtype, got an array; with optax.inject_hyperparams "
                         f"pass static_args=({name!r},)")
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"{name} must be a floating or complex dtype, got {value!r}")
    return jax.dtypes.canonicalize_dtype(dtype)


def floating_dtype(name: str, value: Any,
                   choices: Optional[Collection[str]] = None) -> np.dtype:
    """A floating dtype (`jnp.float32`, `"bfloat16"`, ...), among `choices` if given;
    returns it as a numpy dtype.

    `optax.inject_hyperparams` takes a dtype class for a schedule and passes the array it
    returns: that gets an error telling how to keep the dtype static.
    """
    if isinstance(value, (jax.Array, np.ndarray)):
        raise ValueError(f"{name} must be a dtype, got an array; with optax.inject_hyperparams "
                         f"pass static_args=({name!r},)")
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {value!r}")
    if choices is not None and dtype.name not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {dtype.name!r}")
    return dtype
