"""Per-layer norms of a training step: gradient, update and parameter norms by parameter group.

    norms = layer_norms(grads, updates, params)   # inside the jitted step
    # {"grad_norm/embed": ..., "grad_norm/block_0/attn": ..., "update_norm/head": ...,
    #  "param_norm/block_1/mlp": ..., "update_ratio/block_1/mlp": ..., ...}: float32 scalars

Groups, from each leaf's path: `block_<i>/attn` (the attention projections and the norm in
front of them), `block_<i>/mlp` (likewise), and the first path key elsewhere (`embed`,
`position`, `final_norm`, `head`). Blocks stacked on a leading layer axis (a scanned stack,
path key in `STACKED_KEYS`) are split along that axis into `block_0`, `block_1`, ... the
same groups as unstacked blocks. `update_ratio` is `update_norm / param_norm` with the
params before the update (the relative step size of a group; ~1e-3 is the usual healthy
range for Adam-type optimizers on transformers).

All norms are L2 over the group's elements, summed in float32: one reduction per leaf and
tensor (grads, updates, params), no host sync.
"""
import re

import jax
import jax.numpy as jnp

STACKED_KEYS = ("blocks", "layers")  # a module holding all blocks on a leading layer axis
_BLOCK = re.compile(r"(?:block|layers)_(\d+)")
_KINDS = ("grad_norm", "update_norm", "param_norm")


def _names(path):
    return [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
            for key in path]


def _sublayer(name):
    """`attn_norm` and `attn` -> "attn"; `mlp_norm` and `mlp` -> "mlp"; others as they are."""
    for kind in ("attn", "mlp"):
        if name.startswith(kind):
            return kind
    return name


def group_of(path):
    """`(group, stacked)` of the leaf at `path`: e.g. ("block_0/attn", False); for a leaf
    of a stacked block ("block_{}/mlp", True), the index to be filled from axis 0."""
    names = _names(path)
    for i, name in enumerate(names):
        rest = names[i + 1:]
        sub = "/" + _sublayer(rest[0]) if len(rest) > 1 else ""
        if name in STACKED_KEYS:
            return "block_{}" + sub, True
        match = _BLOCK.fullmatch(name)
        if match:
            return f"block_{match.group(1)}" + sub, False
    return (names[0] if names else "params"), False


def _squares(tree):
    """{group: sum of squares} of a tree (float32), stacked leaves split by layer."""
    sums = {}
    for path, leaf in jax.tree.leaves_with_path(tree):
        group, stacked = group_of(path)
        x = jnp.square(leaf.astype(jnp.float32))
        if stacked:
            per_layer = jnp.sum(x, axis=tuple(range(1, x.ndim)))
            for layer in range(leaf.shape[0]):
                name = group.format(layer)
                sums[name] = sums.get(name, 0.0) + per_layer[layer]
        else:
            sums[group] = sums.get(group, 0.0) + jnp.sum(x)
    return sums


def layer_norms(grads, updates, params):
    """`{"<kind>/<group>": norm}` for kind in grad_norm, update_norm, param_norm,
    update_ratio (see the module docstring). `updates` is the optimizer's output (what
    `optax.apply_updates` adds to `params`)."""
    out = {}
    norms = [_squares(tree) for tree in (grads, updates, params)]
    for kind, sums in zip(_KINDS, norms):
        for group, total in sums.items():
            out[f"{kind}/{group}"] = jnp.sqrt(total)
    for group in norms[2]:
        out[f"update_ratio/{group}"] = (out[f"update_norm/{group}"]
                                        / jnp.maximum(out[f"param_norm/{group}"], 1e-30))
    return out
