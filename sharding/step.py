"""A train step compiled once for a mesh: named in/out shardings, donated state."""
import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn

from ravine.sharding.offload import is_offloaded, to_device
from ravine.sharding.partition import replicated
from ravine.sharding.rules import RULES, Rules


def jit_train_step(step_fn: Callable[[Any, Any], tuple[Any, Any]], mesh: jax.sharding.Mesh,
                   state_shardings: Any, batch_sharding: Any, rules: Rules = RULES,
                   donate: bool = True) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Jits `step_fn(state, batch) -> (state, metrics)` for `mesh` (GSPMD).

    Args:
      step_fn: a pure function of a state pytree and a batch pytree returning the new state
        (same structure) and a pytree of metrics. It may call the model's
        `nn.with_logical_constraint`s: they are resolved with `rules` on `mesh`.
      mesh: the mesh from `make_mesh`.
      state_shardings: a tree of `NamedSharding` matching `state` (e.g. a dict of
        `logical_to_shardings(...)`, `optimizer_state_shardings(...)`, `replicated(mesh)`).
        Leaves in host memory (`host_offload`) are copied to device memory before
        `step_fn` sees them, and their new values back to host memory.
      batch_sharding: `batch_sharding(mesh)` (or a tree of shardings matching `batch`).
      rules: logical axis rules used while tracing (default `RULES`).
      donate: donate the input state's buffers to the output (halves peak state memory; the
        state passed in must not be used after the call).

    Returns:
      `step(state, batch) -> (state, metrics)`, the state laid out as `state_shardings` and
      the metrics replicated. `step.lower(state, batch)` gives the lowered computation
      (e.g. `.compile().as_text()` to inspect its collectives).
    """
    if any(is_offloaded(s) for s in jax.tree.leaves(state_shardings)):
        inner = step_fn

        @functools.wraps(inner)
        def step_fn(state, batch):
            return inner(to_device(state, state_shardings), batch)

    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )

    def in_context(fn):
        # Tracing happens on the first call: flax reads the rules and the mesh from context.
        @functools.wraps(fn)
        def wrapped(state, batch):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(state, batch)
        return wrapped

    step = in_context(jitted)
    step.lower = in_context(jitted.lower)
    return step
