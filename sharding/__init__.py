"""ravine.sharding: meshes, logical-axis rules, shardings for params / optimizer state / batches.

One code path from 1 CPU to a multi-host pod: params are laid out by logical axis names
(`RULES`), optimizer state follows the params (ZeRO stages 0-3 over "data"), the batch is
split over ("data", "fsdp"), and `jit` (GSPMD) inserts the collectives.

Usage (what experiments/train.py does)::

    import jax, jax.numpy as jnp, optax
    from flax import linen as nn
    from ravine import models, sharding

    mesh = sharding.make_mesh("data=2,fsdp=1,tensor=4")          # or config.mesh
    cfg, key = models.TransformerConfig(d_model=64, n_layers=2, n_heads=2), jax.random.key(0)
    model = models.Transformer(cfg)
    loss_fn = lambda params, tokens: models.cross_entropy(
        model.apply({"params": params}, tokens[:, :-1]), tokens[:, 1:])
    init = lambda key: model.init(key, jnp.zeros((1, cfg.max_len), jnp.int32))["params"]
    boxed = jax.eval_shape(init, key)                          # logical names, no memory
    param_sh = sharding.logical_to_shardings(boxed, mesh)      # tree of NamedSharding
    params = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=param_sh)(key)

    tx = optax.adamw(1e-3)                                     # any GradientTransformation
    opt_sh = sharding.optimizer_state_shardings(tx, params, param_sh, zero=0)  # or config.zero
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)

    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
    state_sh = {"step": sharding.replicated(mesh), "params": param_sh, "opt_state": opt_sh}

    def train_step(state, batch):                              # your own: accum, clip, EMA...
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, {"loss": loss}

    step = sharding.jit_train_step(train_step, mesh, state_sh, sharding.batch_sharding(mesh))
    for local_batch in data:                      # uint8 [B, T + 1]: this process's rows only
        state, metrics = step(state, sharding.shard_batch(local_batch, mesh))

ZeRO stages 2 and 3 (`sharding.zero`): `param_shardings_for_zero`, `gradient_shardings`
and `with_sharded_gradients(loss_fn, param_sh, grad_sh)`; host offload of a tree
(`sharding.offload`): `state_sh["opt_state"] = sharding.host_offload(opt_sh)`. Pipeline
stages live on the "stage" axis: see `models.pipeline`.

Memory and communication by formula (`sharding.accounting`: activations per layer by remat
policy, ZeRO bytes per stage and precision, collective bytes of data / ZeRO / tensor /
pipeline parallelism) and as compiled (`sharding.hlo.collectives(compiled.as_text())`: each
collective, its group and the bytes it sends); `bench_parallel` puts them side by side.

Other trees that mirror params (EMA copies, gradient accumulators) get shardings from
`follow_param_shardings(tree, params, param_sh)`. With grad accumulation, a batch shaped
[accum, micro, ...] uses `batch_sharding(mesh, batch_dim=1)` / `shard_batch(..., batch_dim=1)`.
Multi-host: call `jax.distributed.initialize()` before any other JAX call; everything else
is unchanged (each process feeds its own rows to `shard_batch`).
"""
from ravine.sharding import accounting, hlo
from ravine.sharding.batch import BATCH_AXES, batch_sharding, shard_batch
from ravine.sharding.mesh import AXES, DATA, FSDP, STAGE, TENSOR, make_mesh, parse_mesh_spec
from ravine.sharding.offload import HOST, check_host_memory, host_offload
from ravine.sharding.partition import (
    ZERO_STAGES,
    bytes_per_device,
    follow_param_shardings,
    optimizer_state_shardings,
    replicated,
    zero1_spec,
)
from ravine.sharding.rules import RULES, fit_spec, logical_to_shardings, override_rules
from ravine.sharding.step import jit_train_step
from ravine.sharding.zero import gradient_shardings, param_shardings_for_zero, with_sharded_gradients

__all__ = [
    "AXES", "BATCH_AXES", "DATA", "FSDP", "HOST", "RULES", "STAGE", "TENSOR", "ZERO_STAGES",
    "batch_sharding", "bytes_per_device", "check_host_memory", "fit_spec",
    "follow_param_shardings", "gradient_shardings", "host_offload", "jit_train_step",
    "logical_to_shardings", "make_mesh", "optimizer_state_shardings", "override_rules",
    "param_shardings_for_zero", "parse_mesh_spec", "replicated", "shard_batch",
    "with_sharded_gradients", "zero1_spec",
]
