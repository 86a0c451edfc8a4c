"""ZeRO stages 0-3 over the "data" axis: one knob for what data-parallel devices split.

Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (arXiv:1910.02054), Figure 1. Per-device bytes for ravine's float32 params with
AdamW (N = size of "data", Psi = parameter count; the paper's 2 + 2 + K is its fp16 case):

    zero  split over "data"               params   grads    optimizer state   total
    0     nothing (plain data parallel)   4 Psi    4 Psi    8 Psi             16 Psi
    1     optimizer state                 4 Psi    4 Psi    8 Psi / N         8 + 8/N Psi
    2     + gradients                     4 Psi    4 Psi/N  8 Psi / N         4 + 12/N Psi
    3     + params (gathered per use)     4 Psi/N  4 Psi/N  8 Psi / N         16/N Psi

Every stage splits a leaf the same way, `zero1_spec` ("data" on its largest evenly
divisible dimension): the optimizer state (`optimizer_state_shardings(..., zero)`), the
gradients (`gradient_shardings` + `with_sharded_gradients`: the backward pass ends in a
reduce-scatter, each device updating only its shard) and at zero=3 the params
(`param_shardings_for_zero`), gathered where they are used.

zero=3 over "data" and the "fsdp" mesh axis are the same scheme: the batch is split over
both, and so are params, gradients and optimizer state. They differ only in the dimension
they split ("fsdp" the "embed" one, by the logical rules; zero=3 the largest one) and may
be combined (`--mesh=data=2,fsdp=4 --zero=3`).

Wiring (what a train job adds)::

    param_sh = sharding.param_shardings_for_zero(
        params, sharding.logical_to_shardings(boxed, mesh), zero)
    grad_sh = sharding.gradient_shardings(params, param_sh, zero)
    loss_fn = sharding.with_sharded_gradients(loss_fn, param_sh, grad_sh)  # no-op below 2
    opt_sh = sharding.optimizer_state_shardings(tx, params, param_sh, zero)
"""
import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from ravine.sharding.mesh import DATA
from ravine.sharding.partition import check_zero, zero1_spec


def param_shardings_for_zero(params: Any, param_shardings: Any, zero: int) -> Any:
    """The params' shardings at ZeRO stage `zero`: at 3 also split over "data".

    Args:
      params: the (unboxed) params or their shapes.
      param_shardings: their shardings without ZeRO (from `logical_to_shardings`).
      zero: 0, 1, 2 or 3.

    Returns:
      `param_shardings` itself for zero < 3; for zero=3 each leaf with "data" added by
      `zero1_spec` (the layout its optimizer state has at zero >= 1).
    """
    check_zero(zero)
    if zero < 3:
        return param_shardings
    return jax.tree.map(
        lambda x, s: NamedSharding(s.mesh, zero1_spec(s.spec, x.shape, s.mesh)),
        nn.unbox(params), param_shardings)


def gradient_shardings(params: Any, param_shardings: Any, zero: int) -> Any:
    """Where the gradients live at ZeRO stage `zero`: split over "data" for zero >= 2.

    `param_shardings` itself for zero < 2 (the gradients are all-reduced); otherwise each
    leaf also split over "data" as `zero1_spec` does (and as zero=3 splits the params).
    """
    check_zero(zero)
    if zero < 2:
        return param_shardings
    return param_shardings_for_zero(params, param_shardings, 3)


def _data_dim(spec):
    for i, entry in enumerate(spec):
        if DATA in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
            return i
    return None


def _rules_without_data(rules):
    """Logical rules with "data" dropped: inside a region manual over "data", the other
    mesh axes are still placed by the model's constraints but "data" may not be named."""
    def strip(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes if a != DATA)
        return None if not kept else kept[0] if len(kept) == 1 else kept
    return tuple((name, strip(axes)) for name, axes in rules)


def _partial_manual_supported(mesh):
    """jaxlib 0.10.2's SPMD partitioner aborts the process (a CHECK failure in
    spmd_partitioner_util.cc) on this program when two other mesh axes besides "data" are
    larger than 1 (e.g. data=2,fsdp=2,tensor=2); there the gradient is laid out by a
    sharding constraint instead."""
    return sum(size > 1 for name, size in mesh.shape.items() if name != DATA) <= 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reduce_scatter_gradient(dim, full, shard):
    """`full` (a param replicated over "data") as used per device; its gradient goes to
    `shard` (the same param's "data" shard, split along `dim`), reduce-scattered."""
    return jax.lax.pcast(full, DATA, to="varying")


def _reduce_scatter_forward(dim, full, shard):
    return _reduce_scatter_gradient(dim, full, shard), None


def _reduce_scatter_backward(dim, _, cotangent):
    return None, jax.lax.psum_scatter(cotangent, DATA, scatter_dimension=dim, tiled=True)


_reduce_scatter_gradient.defvjp(_reduce_scatter_forward, _reduce_scatter_backward)


def with_sharded_gradients(loss_fn: Callable[..., jax.Array], param_shardings: Any,
                           grad_shardings: Any) -> Callable[..., jax.Array]:
    """`loss_fn(params, *batch)` whose gradient w.r.t. params comes out as `grad_shardings`.

    Where some gradient leaf is split over "data" (zero >= 2), the loss runs per data shard
    inside `jax.shard_map` (manual over "data" only; the other mesh axes stay automatic)
    and the loss is averaged over "data". Per leaf:

    - param split over "data" (zero=3): all-gathered where used; the derivative of the
      all-gather is a reduce-scatter of the gradient;
    - param replicated, gradient split (zero=2): used as it is, and its per-device gradient
      is reduce-scattered onto the param's "data" shard (no gathered copy is made);
    - neither (zero < 2, or a leaf no dimension of which "data" divides): all-reduced.

    So each device receives only its shard of the summed gradient, and a gradient
    accumulator summing such gradients is split too. Below zero=2 `loss_fn` is returned
    unchanged. On meshes the partitioner cannot compile this program for (see
    `_partial_manual_supported`) the gradient is constrained to `grad_shardings` instead:
    same values and layout; XLA:GPU/TPU form the reduce-scatter themselves, XLA:CPU leaves
    an all-reduce followed by a slice.

    Args:
      loss_fn: `loss_fn(params, *batch) -> scalar`, the mean over rows of `batch` arrays
        whose dimension 0 is split over "data" (as `batch_sharding` does); every data shard
        must hold the same number of rows.
      param_shardings: the params' shardings (`param_shardings_for_zero`).
      grad_shardings: the gradients' (`gradient_shardings`), a tree of the same structure.

    Returns:
      A function with `loss_fn`'s signature and values.
    """
    grad_leaves, treedef = jax.tree.flatten(grad_shardings)
    param_leaves = treedef.flatten_up_to(param_shardings)
    modes = []   # per leaf: ("plain", None), ("scatter", dim) or ("gather", dim)
    for param_sh, grad_sh in zip(param_leaves, grad_leaves):
        param_dim, grad_dim = _data_dim(param_sh.spec), _data_dim(grad_sh.spec)
        if param_dim is not None:
            if grad_dim != param_dim:
                raise ValueError(f"a param split over 'data' ({param_sh.spec}) needs its "
                                 f"gradient split the same way, got {grad_sh.spec}")
            modes.append(("gather", param_dim))
        else:
            modes.append(("plain", None) if grad_dim is None else ("scatter", grad_dim))
    if all(mode == "plain" for mode, _ in modes):
        return loss_fn
    mesh = grad_leaves[0].mesh
    if not _partial_manual_supported(mesh):
        return _constrained_gradients(loss_fn, grad_shardings)

    def data_spec(ndim, dim):
        return PartitionSpec(*[DATA if i == dim else None for i in range(ndim)])

    def wrapped(params, *batch):
        leaves = treedef.flatten_up_to(params)
        full = [jax.lax.stop_gradient(x) if mode == "scatter" else x
                for x, (mode, _) in zip(leaves, modes) if mode != "gather"]
        shards = [jax.lax.with_sharding_constraint(x, g)
                  for x, g, (mode, _) in zip(leaves, grad_leaves, modes) if mode != "plain"]
        shard_specs = [data_spec(x.ndim, dim)
                       for x, (mode, dim) in zip(leaves, modes) if mode != "plain"]
        rules = _rules_without_data(nn.get_logical_axis_rules())

        def per_shard(full, shards, *rows):
            full, shards, used = iter(full), iter(shards), []
            for mode, dim in modes:
                if mode == "plain":
                    used.append(next(full))
                elif mode == "scatter":
                    used.append(_reduce_scatter_gradient(dim, next(full), next(shards)))
                else:
                    used.append(jax.lax.all_gather(next(shards), DATA, axis=dim, tiled=True))
            with nn.logical_axis_rules(rules):
                loss = loss_fn(treedef.unflatten(used), *rows)
            return jax.lax.pmean(loss, DATA)

        in_specs = ([PartitionSpec()] * len(full), shard_specs) + (PartitionSpec(DATA),) * len(batch)
        return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(),
                             axis_names={DATA})(full, shards, *batch)

    return wrapped


def _constrained_gradients(loss_fn, grad_shardings):
    """`loss_fn` with params passed through an identity that lays out their cotangent."""
    @jax.custom_vjp
    def constrained(params):
        return params

    def forward(params):
        return params, None

    def backward(_, cotangent):
        return (jax.lax.with_sharding_constraint(cotangent, grad_shardings),)

    constrained.defvjp(forward, backward)

    def wrapped(params, *batch):
        return loss_fn(constrained(params), *batch)

    return wrapped
