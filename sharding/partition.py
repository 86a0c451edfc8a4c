"""Shardings for trees that mirror params (optimizer state, EMA) and the ZeRO stages.

Optimizer states are pytrees that embed copies of the params tree (Adam's `mu`/`nu`),
per-param pieces of other shapes (Adafactor's factored rows/cols, Shampoo statistics)
and counters. Each state leaf is matched to the param whose tree path it contains; a
same-shaped leaf takes that param's sharding, a differently shaped one keeps the param's
axes on the dimensions it shares with it. Leaves that match no param path take the
sharding of the params of the same shape (when those agree), else are replicated.

ZeRO-1 (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models") additionally splits every non-scalar state leaf over the "data" axis,
so data-parallel replicas each hold 1/data of the optimizer state while params stay
replicated over "data"; GSPMD then turns the update into reduce-scatter + sharded update
+ all-gather of the new params.

ZeRO stages 2 and 3 (gradients, params) build on the same split: see `sharding.zero`.
"""
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from ravine.sharding.mesh import DATA
from ravine.sharding.rules import fit_spec

ZERO_STAGES = (0, 1, 2, 3)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """`NamedSharding` holding a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def _axes(entry):
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def zero1_spec(spec: PartitionSpec, shape: Sequence[int],
               mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Adds the "data" axis to the largest dimension of `shape` it evenly divides (in front).

    The dimension with the largest per-device extent is chosen so that the split is even;
    an array already sharded over "data", a scalar, or one no dimension of which divides
    stays as it is.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    data = mesh.shape[DATA]
    if data == 1 or any(DATA in _axes(e) for e in entries):
        return PartitionSpec(*entries)
    best, best_extent = None, 0
    for i, (dim, entry) in enumerate(zip(shape, entries)):
        split = int(np.prod([mesh.shape[a] for a in _axes(entry)]))
        if dim % (split * data) == 0 and dim // split > best_extent:
            best, best_extent = i, dim // split
    if best is not None:
        # "data" goes first: it is the outermost mesh axis, so (data, tensor) keeps each data
        # shard's tensor pieces on neighbouring devices.
        entries[best] = _entry((DATA,) + _axes(entries[best]))
    return PartitionSpec(*entries)


def _align_spec(shape, param_shape, param_spec):
    """Spec for a leaf derived from a param of another shape: shared dims keep their axes.

    State dims are matched in order to equal-sized param dims (e.g. Adafactor's row factor
    of a (rows, cols) kernel keeps the rows' axes); unmatched dims are unsharded. A leaf
    with more dims than its param (e.g. Shampoo's stacked [blocks..., b, b] statistics)
    is no slice of it, so sizes that agree by chance say nothing: it stays unsharded.
    """
    if len(shape) > len(param_shape):
        return PartitionSpec()
    param_entries = list(param_spec) + [None] * (len(param_shape) - len(param_spec))
    entries, j = [], 0
    for dim in shape:
        k = j
        while k < len(param_shape) and param_shape[k] != dim:
            k += 1
        if k < len(param_shape):
            entries.append(param_entries[k])
            j = k + 1
        else:
            entries.append(None)
    return PartitionSpec(*entries)


def _find_param(path, by_path, max_len):
    """The longest param path occurring contiguously inside a state leaf's path."""
    for length in range(min(max_len, len(path)), 0, -1):
        for start in range(len(path) - length + 1):
            found = by_path.get(tuple(path[start:start + length]))
            if found is not None:
                return found
    return None


def follow_param_shardings(tree: Any, params: Any, param_shardings: Any, zero: int = 0) -> Any:
    """Shardings for a tree derived from params (optimizer state, EMA, accumulators).

    Args:
      tree: the tree to shard: arrays or `jax.ShapeDtypeStruct`s (e.g. from
        `jax.eval_shape(tx.init, params)`).
      params: the (unboxed) params or their shapes.
      param_shardings: the matching tree of `NamedSharding`s (from `logical_to_shardings`).
      zero: a ZeRO stage; any stage >= 1 splits non-scalar leaves over "data" too (see
        `zero1_spec`).

    Returns:
      A tree of `NamedSharding` with the structure of `tree`. Rule per leaf: scalars are
      replicated; a leaf whose path contains a param's path takes that param's sharding
      (same shape) or its axes on the shared dimensions (other shape, no more dims than
      the param; with more, e.g. stacked Shampoo blocks, unsharded); otherwise the
      sharding of same-shaped params if they all agree; otherwise replicated.
    """
    check_zero(zero)
    params = nn.unbox(params)
    param_leaves = jax.tree.leaves_with_path(params)
    sharding_leaves = jax.tree.leaves(param_shardings)
    if len(param_leaves) != len(sharding_leaves):
        raise ValueError(f"params have {len(param_leaves)} leaves but param_shardings has "
                         f"{len(sharding_leaves)}")
    if not sharding_leaves:
        raise ValueError("params is empty: there is no param sharding (and mesh) to follow")
    mesh = sharding_leaves[0].mesh

    by_path, by_shape = {}, {}
    for (path, leaf), sharding in zip(param_leaves, sharding_leaves):
        shape = tuple(np.shape(leaf))
        by_path[tuple(path)] = (shape, sharding.spec)
        by_shape.setdefault(shape, set()).add(sharding.spec)
    max_len = max(len(p) for p in by_path)

    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        if not shape:
            return replicated(mesh)
        found = _find_param(path, by_path, max_len)
        if found is not None:
            param_shape, param_spec = found
            spec = (param_spec if shape == param_shape
                    else _align_spec(shape, param_shape, param_spec))
        elif len(by_shape.get(shape, ())) == 1:
            (spec,) = by_shape[shape]
        else:
            spec = PartitionSpec()
        spec = fit_spec(spec, shape, mesh)
        if zero:
            spec = zero1_spec(spec, shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, tree)


def check_zero(zero: int) -> None:
    if isinstance(zero, bool) or zero not in ZERO_STAGES:
        raise ValueError(f"zero must be one of {ZERO_STAGES}, got {zero!r}")


def optimizer_state_shardings(tx: optax.GradientTransformation, params: Any,
                              param_shardings: Any, zero: int = 0) -> Any:
    """Shardings for `tx.init(params)`, following the params' (see `follow_param_shardings`).

    Works for any Optax `GradientTransformation`: the state's shapes come from
    `jax.eval_shape(tx.init, params)`, so nothing is allocated. Use the result as
    `out_shardings` of a jitted `tx.init` and in the train step's state shardings.
    `zero` >= 1 splits the state over "data" (ZeRO-1; stages 2 and 3 keep it split).
    Pass the params' shardings as `param_shardings_for_zero` returns them.
    """
    state_shapes = jax.eval_shape(tx.init, nn.unbox(params))
    return follow_param_shardings(state_shapes, params, param_shardings, zero=zero)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """`{device: bytes}` of the shards of `tree`'s arrays stored on each local device."""
    totals = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
