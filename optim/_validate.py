"""Eager hyperparameter checks shared by every optimizer: ValueError naming the argument."""
import math


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def learning_rate(value, name="learning_rate"):
    """A learning rate is a non-negative finite number or a schedule (callable)."""
    if callable(value):
        return
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number or a schedule, got {value!r}")


def in_range(name, value, low=0.0, high=1.0, high_inclusive=False):
    """`low <= value < high` (or `<= high` when high_inclusive)."""
    ok = _is_number(value) and low <= value and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def non_negative(name, value):
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def one_of(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
