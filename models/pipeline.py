"""GPipe pipeline parallelism for `models.Transformer` over the "stage" mesh axis.

The n_layers blocks are split into S contiguous stages (S = the mesh's "stage" size). Their
params are stacked into one tree with a leading layer axis, logical name "layers" (which
`sharding.RULES` maps to "stage"), so stage s holds layers [s L/S, (s + 1) L/S). The batch
is split into M micro-batches and a GPipe schedule (Huang et al., 2019, "GPipe: Efficient
Training of Giant Neural Networks using Pipeline Parallelism", arXiv:1811.06965) runs
M + S - 1 ticks inside `jax.shard_map` (manual over "stage" only; "data", "fsdp" and
"tensor" stay automatic, so the pipeline composes with them):

    tick t: stage 0 reads micro-batch t; every stage s runs its layers on what it holds
            (micro-batch t - s while 0 <= t - s < M, a bubble otherwise) and passes the
            result to stage s + 1 with `ppermute`; the last stage keeps micro-batch
            t - S + 1.

Stage s is busy in M of the M + S - 1 ticks: the bubble fraction is (S - 1)/(M + S - 1).
The backward pass is jax's derivative of this forward (ppermute transposes to the reverse
permutation), so it runs the same schedule in reverse. Embedding, final norm and head run
outside the pipeline on every stage (they are small next to the blocks). The
micro-batches are the rows `i::M` of the batch, so a data-sharded batch stays sharded the
same way; the loss is a mean over rows, so which rows form a micro-batch does not matter.

MaxText's `layers/pipeline.py` is the design this follows (stacked stage params, a
circular shift of the activations each tick); this is a smaller, GPipe-only version.

Example::

    params = pipeline.stack_blocks(nn.unbox(transformer_params))      # blocks -> "blocks"
    with jax.set_mesh(sharding.make_mesh("stage=4,data=2")), nn.logical_axis_rules(RULES):
        logits = jax.jit(lambda p, t: pipeline.apply(config, p, t, microbatches=4))(
            params, tokens)

Optimizers see the stacked leaves (layers, ...); `per_layer(tx)` makes any per-leaf
optimizer treat the layer axis as a batch axis, so the updates equal the unstacked ones.
"""
import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import AxisType, PartitionSpec

from ravine.models.transformer import REMAT_POLICIES, Block, Transformer, TransformerConfig

BLOCKS = "blocks"   # params key of the stacked blocks
LAYERS = "layers"   # logical axis name of the stacking axis
STAGE = "stage"     # the mesh axis the stages live on
_BLOCK_NAME = re.compile(r"block_(\d+)$")


def _is_box(x):
    return isinstance(x, nn.Partitioned)


def _stack_leaves(*leaves):
    first = leaves[0]
    if _is_box(first):
        value = _stack_leaves(*(leaf.value for leaf in leaves))
        return first.replace(value=value, names=(LAYERS,) + tuple(first.names))
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype)
    return jnp.stack(leaves)


def stack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """`Transformer` params -> the same with `block_0 ... block_{L-1}` stacked under "blocks".

    Works on unboxed arrays, on boxed params (`nn.LogicallyPartitioned`: the stacking axis is
    named "layers") and on `jax.eval_shape` results. Other entries are kept as they are.
    """
    indices = sorted(int(m.group(1)) for m in map(_BLOCK_NAME.match, params) if m)
    if not indices:
        raise ValueError(f"params have no block_<i> entries to stack; keys: {sorted(params)}")
    if indices != list(range(len(indices))):
        raise ValueError(f"block indices must be 0..{len(indices) - 1}, got {indices}")
    blocks = [params[f"block_{i}"] for i in indices]
    rest = {k: v for k, v in params.items() if not _BLOCK_NAME.match(k)}
    return {**rest, BLOCKS: jax.tree.map(_stack_leaves, *blocks, is_leaf=_is_box)}


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `stack_blocks` for unboxed params."""
    stacked = params[BLOCKS]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != BLOCKS}
    return {**rest, **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                       for i in range(n_layers)}}


def _check_microbatches(microbatches):
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")


def check_divisible(n_layers: int, stages: int, batch_size: int, microbatches: int) -> None:
    """Raises ValueError (naming both numbers) unless S | n_layers and M | batch_size."""
    _check_microbatches(microbatches)
    if n_layers % stages:
        raise ValueError(f"n_layers={n_layers} is not divisible by the {stages} pipeline "
                         f"stages (mesh axis stage={stages})")
    if batch_size % microbatches:
        raise ValueError(f"batch size {batch_size} is not divisible by "
                         f"microbatches={microbatches}")


def _layers_fn(config):
    """`(x, stacked_params) -> x` through every layer of the stack, in order (a scan)."""
    def one(x, layer_params):
        return Block(config).apply({"params": layer_params}, x), None

    if config.remat != "none":
        one = jax.checkpoint(one, policy=REMAT_POLICIES[config.remat])
    return lambda x, stacked: jax.lax.scan(one, x, stacked)[0]


def gpipe(layers_fn: Callable[[jax.Array, Any], jax.Array], stacked: Any, xs: jax.Array,
          num_stages: int) -> jax.Array:
    """Runs micro-batches `xs` [M, ...] through the layers in `stacked`, GPipe-scheduled.

    Must run under a mesh whose "stage" axis has `num_stages` devices; `stacked` has a
    leading layer axis divisible by it. Returns [M, ...]: `layers_fn` applied to each
    micro-batch, exactly as `layers_fn(xs[m], stacked)` would give.
    """
    microbatches = xs.shape[0]
    ticks = microbatches + num_stages - 1
    shift = [(s, (s + 1) % num_stages) for s in range(num_stages)]

    def per_stage(stage_params, xs):
        stage = jax.lax.axis_index(STAGE)
        first, last = stage == 0, stage == num_stages - 1

        def tick(carry, t):
            held, outputs = carry
            # Stage 0 takes micro-batch t (the clamp only matters in the bubble ticks).
            fresh = jax.lax.dynamic_index_in_dim(xs, jnp.minimum(t, microbatches - 1),
                                                 keepdims=False)
            y = layers_fn(jnp.where(first, fresh, held), stage_params)
            done = t - (num_stages - 1)   # the micro-batch the last stage finishes now
            slot = jnp.clip(done, 0, microbatches - 1)
            keep = last & (done >= 0)
            old = jax.lax.dynamic_index_in_dim(outputs, slot, keepdims=False)
            outputs = jax.lax.dynamic_update_index_in_dim(
                outputs, jnp.where(keep, y, old), slot, 0)
            return (jax.lax.ppermute(y, STAGE, shift), outputs), None

        held = jax.lax.pcast(jnp.zeros_like(xs[0]), STAGE, to="varying")
        outputs = jax.lax.pcast(jnp.zeros_like(xs), STAGE, to="varying")
        (_, outputs), _ = jax.lax.scan(tick, (held, outputs), jnp.arange(ticks))
        # Only the last stage holds results: summing over stages hands them to all.
        return jax.lax.psum(jnp.where(last, outputs, jnp.zeros_like(outputs)), STAGE)

    return jax.shard_map(per_stage, in_specs=(PartitionSpec(STAGE), PartitionSpec()),
                         out_specs=PartitionSpec(), axis_names={STAGE})(stacked, xs)


def run_blocks(config: TransformerConfig, stacked: Any, x: jax.Array,
               microbatches: int) -> jax.Array:
    """The blocks of `config` on activations x [B, T, D], pipelined over the "stage" axis.

    Without a mesh or with stage=1 the layers simply run in order on the whole batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    num_stages = 1 if mesh.empty or STAGE not in mesh.axis_names else mesh.shape[STAGE]
    manual = [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
              if kind == AxisType.Manual] if not mesh.empty else []
    if num_stages > 1 and manual:
        # jax 0.10's Shardy rejects a shard_map over "stage" nested in one over "data".
        raise ValueError(f"the pipeline cannot run inside a shard_map manual over {manual} "
                         f"(e.g. sharding.with_sharded_gradients at zero >= 2); with "
                         f"stage={num_stages} use zero <= 1")
    batch = x.shape[0]
    check_divisible(config.n_layers, num_stages, batch, microbatches)
    layers_fn = _layers_fn(config)
    if num_stages == 1:
        return layers_fn(x, stacked)
    # Micro-batch m is rows m::M: [B, ...] -> [B/M, M, ...] keeps the batch sharding on B/M.
    xs = x.reshape((batch // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)
    xs = nn.with_logical_constraint(xs, (None, "batch", "length", "embed"))
    ys = gpipe(layers_fn, stacked, xs, num_stages)
    y = ys.swapaxes(0, 1).reshape(x.shape)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def apply(config: TransformerConfig, params: dict[str, Any], tokens: jax.Array,
          microbatches: int = 1) -> jax.Array:
    """`Transformer(config).apply` for stacked params (`stack_blocks`), blocks pipelined.

    Args:
      config: the `TransformerConfig`.
      params: unboxed params with the blocks stacked under "blocks".
      tokens: int tokens [B, T]; B must be divisible by `microbatches`.
      microbatches: M, micro-batches per pipeline pass.

    Returns:
      logits [B, T, vocab], equal to the unpipelined model's on `unstack_blocks(params)`.

    The embedding, final norm and head are the `Transformer`'s own code: its block calls
    are intercepted, the first one running every stacked block, the others passing through.
    """
    stacked = params[BLOCKS]
    rest = {k: v for k, v in params.items() if k != BLOCKS}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and isinstance(module.parent, Transformer)
                and _BLOCK_NAME.match(module.name or "")):
            x = args[0]
            return run_blocks(config, stacked, x, microbatches) if module.name == "block_0" else x
        return next_fun(*args, **kwargs)

    # Remat is applied to the stacked layers (`_layers_fn`); the outer model's blocks are
    # never run, and a remat-wrapped block would be called under another scope.
    outer = Transformer(dataclasses.replace(config, remat="none"))
    with nn.intercept_methods(interceptor):
        return outer.apply({"params": rest}, tokens)


class Pipelined:
    """`Transformer(config)` with stacked, pipelined blocks, behind flax's `init` / `apply`.

    A drop-in for the model object of a train job: `init(rngs, tokens)` gives the
    Transformer's variables with the blocks stacked (boxed, the stacking axis named
    "layers", so `sharding.logical_to_shardings` puts it on "stage") and
    `apply(variables, tokens)` runs `apply(config, params, tokens, microbatches)`.

    Example::

        model = pipeline.Pipelined(config, microbatches=8)
        boxed = jax.eval_shape(model.init, key, tokens)["params"]   # {"blocks": ..., ...}
    """

    def __init__(self, config: TransformerConfig, microbatches: int):
        _check_microbatches(microbatches)
        self.config, self.microbatches = config, microbatches

    def init(self, rngs: Any, tokens: jax.Array) -> dict[str, Any]:
        variables = Transformer(self.config).init(rngs, tokens)
        return {**variables, "params": stack_blocks(variables["params"])}

    def apply(self, variables: dict[str, Any], tokens: jax.Array) -> jax.Array:
        return apply(self.config, nn.unbox(variables["params"]), tokens, self.microbatches)


class PerLayerState(NamedTuple):
    """State of `per_layer`: the inner state of the stacked blocks (vmapped) and the rest."""
    blocks: Any
    rest: Any


def _split(tree):
    return {BLOCKS: tree[BLOCKS]}, {k: v for k, v in tree.items() if k != BLOCKS}


def per_layer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` treating the leading layer axis of the stacked blocks as a batch axis.

    The stacked blocks get `jax.vmap(tx.update)` over the layer axis, every other param
    plain `tx`, so an optimizer whose update is per leaf (AdamW, Lion, Muon, Shampoo,
    SOAP, Adafactor: all of `optim`'s) makes exactly the updates it makes on unstacked
    params. The vmapped state keeps the layer axis in front, so it shards over "stage" like
    its params. Optimizers that couple leaves (global clipping, K-FAC) must not be wrapped:
    apply clipping outside (`optax.chain(optax.clip_by_global_norm(c), per_layer(tx))`).

    Args:
      tx: an `optax.GradientTransformation`.

    Returns:
      An `optax.GradientTransformation` over params with a "blocks" entry.
    """
    def init_fn(params):
        blocks, rest = _split(params)
        return PerLayerState(blocks=jax.vmap(tx.init)(blocks), rest=tx.init(rest))

    def update_fn(updates, state, params=None):
        update_blocks, update_rest = _split(updates)
        param_blocks, param_rest = _split(params) if params is not None else (None, None)
        if params is None:
            new_blocks, blocks_state = jax.vmap(lambda u, s: tx.update(u, s))(
                update_blocks, state.blocks)
        else:
            new_blocks, blocks_state = jax.vmap(tx.update)(update_blocks, state.blocks,
                                                           param_blocks)
        new_rest, rest_state = tx.update(update_rest, state.rest, param_rest)
        return {**new_rest, **new_blocks}, PerLayerState(blocks=blocks_state, rest=rest_state)

    return optax.GradientTransformation(init_fn, update_fn)
