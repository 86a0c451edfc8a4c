"""Logical axis names -> mesh axes, and the NamedShardings they give boxed params."""
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from ravine.sharding.mesh import DATA, FSDP, STAGE, TENSOR

# Megatron-style tensor parallelism falls out of these: a matrix ("embed", "mlp") is
# column-parallel and ("mlp", "embed") row-parallel, so a block needs one all-reduce per
# matmul pair. FSDP shards "embed"; activations ("batch", "length", "embed") keep embed
# unsharded because flax gives each mesh axis to the first logical name that claims it.
# "layers" is the stacking axis of pipelined blocks (models.pipeline): one slice per stage.
RULES = (
    ("batch", (DATA, FSDP)),
    ("embed", FSDP),
    ("mlp", TENSOR),
    ("heads", TENSOR),
    ("vocab", TENSOR),
    ("kv", None),
    ("length", None),
    ("layers", STAGE),
)


# Logical-name -> mesh-axes pairs, as `RULES`: an axis name, a tuple of them, or None.
Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def override_rules(overrides: Mapping[str, str | Sequence[str] | None],
                   rules: Rules = RULES) -> Rules:
    """Returns `rules` with the logical names in `overrides` (a mapping) remapped.

    `override_rules({"embed": None})` turns FSDP off; a name not in `rules` is added.

    Example:
      >>> from ravine.sharding import RULES, override_rules
      >>> dict(override_rules({"embed": None}))["embed"] is None, dict(RULES)["embed"]
      (True, 'fsdp')
    """
    if not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a mapping of logical name -> mesh axes, "
                         f"got {overrides!r}")
    kept = tuple((name, axes) for name, axes in rules if name not in overrides)
    return tuple(overrides.items()) + kept


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Drops mesh axes that do not evenly divide their dimension (jax requires even shards).

    A dimension sharded over `("data", "fsdp")` keeps the longest prefix of axes whose
    product divides it, so e.g. 6 heads on tensor=4 stay replicated instead of failing.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept, product = [], 1
        for name in names:
            if dim % (product * mesh.shape[name]):
                break
            kept.append(name)
            product *= mesh.shape[name]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while fitted and fitted[-1] is None:
        fitted.pop()
    return PartitionSpec(*fitted)


def _is_box(x):
    return isinstance(x, nn.Partitioned)


def logical_to_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Rules = RULES) -> Any:
    """NamedShardings for the unboxed version of a tree of logically-boxed params.

    Args:
      tree: params (or variables, or `jax.eval_shape(model.init, ...)` of them) whose leaves
        are `nn.LogicallyPartitioned` boxes, as `nn.with_logical_partitioning` makes them
        (`nn.Partitioned` boxes with mesh-axis names are taken as they are); plain
        (unboxed) leaves are allowed and come out replicated.
      mesh: a mesh from `make_mesh`.
      rules: logical-name -> mesh-axes pairs, in priority order (default `RULES`).

    Returns:
      A tree with the structure of `nn.unbox(tree)` whose leaves are `NamedSharding`s.
      Axes that do not divide a dimension are dropped (see `fit_spec`).
    """
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
        elif _is_box(leaf):  # nn.with_partitioning: the names are mesh axes already
            spec = PartitionSpec(*leaf.names)
        else:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, fit_spec(spec, leaf.value.shape, mesh))

    return jax.tree.map(one, tree, is_leaf=_is_box)
