"""The train state: one typed pytree, defined here once.

Every job (train, sweep, race, K-FAC's own step) carries a `TrainState`; Orbax checkpoints
it whole, shardings are a `TrainState` of shardings, and a vmapped sweep stacks its leaves
on a run axis (`shared_leaves` says which stay unbatched).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ravine import optim


class TrainState(NamedTuple):
    """The state of one training run.

    Attributes:
      step: int32 scalar, optimizer steps taken (skipped ones included).
      params: the model params (unboxed).
      opt_state: the optimizer's state.
      loss_scale: an optim loss scale (NoOp / Static / Dynamic).
      skipped: int32 scalar, steps skipped because the gradients were not finite.
      ema: an EMA of the params in float32 (`config.ema_decay > 0`), else None.
      average: an `optim.TailAverage` of the params (`config.average_from_step >= 0`),
        else None.
    """
    step: Any
    params: Any
    opt_state: Any
    loss_scale: Any
    skipped: Any
    ema: Any = None
    average: Any = None


def init_state(params: Any, opt_state: Any, loss_scale: Any, ema_decay: float = 0.0,
               average_from_step: int = -1) -> TrainState:
    """The state at step 0 around `params` and the optimizer state `opt_state`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
        loss_scale=loss_scale, skipped=jnp.zeros((), jnp.int32),
        ema=optim.init_average(params) if ema_decay else None,
        average=optim.init_tail_average(params) if average_from_step >= 0 else None)


def shared_leaves(state: TrainState) -> Any:
    """A `TrainState` of bools: True for the leaves the runs of a vmapped group share, the
    integer scalars of `step` and `opt_state` (step counters; they decide refresh conds)."""
    def shared(path, leaf):
        return getattr(path[0], "name", None) in ("step", "opt_state") and _is_counter(leaf)

    return jax.tree.map_with_path(shared, state)


def shared_counters(tree: Any) -> Any:
    """A tree of bools for any state (an optimizer's, a `TrainState`'s parts): True for its
    integer scalars (step counters), which the runs of a vmapped group share unbatched so that
    a `lax.cond` on them stays a cond (the benchmark's and the scaling study's programs)."""
    return jax.tree.map(_is_counter, tree)


def _is_counter(leaf) -> bool:
    """An integer scalar: a step counter."""
    return leaf.ndim == 0 and jnp.issubdtype(leaf.dtype, jnp.integer)
