"""A tiny LM trained with ravine.sharding: shared by the sharding tests and run as a worker.

As a module it gives `train_losses(...)`, used in-process by tests/test_sharding.py. As a
script it is one process of a multi-process (multi-host) run:

    JAX_PLATFORMS=cpu python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json

Each process brings 4 CPU devices, joins the others over gloo, trains the configurations in
`MULTIHOST_RUNS` feeding only its own rows of every batch, and process 0 writes the losses.
"""
import json
import os
import sys

if __name__ == "__main__":  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine import sharding

VOCAB, D_MODEL, D_FF, HEADS = 48, 32, 80, 4
BATCH, SEQ = 16, 12
MULTIHOST_RUNS = (("adamw", "data=8", 0), ("adamw", "data=2,fsdp=2,tensor=2", 1))


def make_model():
    """A one-block models.Transformer (SwiGLU, RoPE): every weight has logical axis names."""
    return models.Transformer(models.TransformerConfig(
        vocab_size=VOCAB, d_model=D_MODEL, n_layers=1, n_heads=HEADS, d_ff=D_FF, max_len=SEQ))


def make_optimizer(name):
    if name == "adamw":
        return optim.adamw(3e-3, weight_decay=1e-2)
    if name in ("shampoo", "shampoo_eigh"):
        # Newton roots by default: matmul-only, so the blocks stay on their devices; eigh
        # runs one matrix per call on CPU (see optim._blocks.per_matrix).
        return optim.shampoo(3e-3, block_size=16, precondition_every=3,
                             start_preconditioning_step=3,
                             inverse_root="eigh" if name == "shampoo_eigh" else "newton")
    raise ValueError(f"unknown optimizer {name!r}")


def param_shapes():
    """The model's params as `jax.ShapeDtypeStruct`s boxed with their logical axis names."""
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    return jax.eval_shape(make_model().init, jax.random.key(0), tokens)["params"]


def host_params(boxed):
    """Initial params made with numpy: N(0, 0.1^2) weights, unit norm scales.

    (Building them with jax.random would compile a sharded RNG program per mesh, which is
    most of a test's time on a small CPU.)
    """
    rng = np.random.default_rng(0)

    def one(path, x):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(x.shape, np.float32)
        return rng.normal(0.0, 0.1, x.shape).astype(np.float32)

    return jax.tree.map_with_path(one, nn.unbox(boxed))


def global_batch(step):
    """Step `step`'s token batch [BATCH, SEQ + 1]: noisy arithmetic sequences mod VOCAB."""
    rng = np.random.default_rng(step)
    start = rng.integers(0, VOCAB, (BATCH, 1))
    stride = rng.integers(1, 4, (BATCH, 1))
    tokens = (start + stride * np.arange(SEQ + 1)) % VOCAB
    noise = rng.random(tokens.shape) < 0.1
    return np.where(noise, rng.integers(0, VOCAB, tokens.shape), tokens).astype(np.int32)


def local_rows(batch):
    """This process's contiguous share of the batch rows (all of them with one process)."""
    n, i = jax.process_count(), jax.process_index()
    share = batch.shape[0] // n
    return batch[i * share:(i + 1) * share]


def setup(optimizer, mesh_spec, zero=0, devices=None):
    """Mesh, sharded initial train state, its shardings and the jitted train step."""
    mesh = sharding.make_mesh(mesh_spec, devices)
    model, tx = make_model(), make_optimizer(optimizer)
    boxed = param_shapes()
    param_sh = sharding.logical_to_shardings(boxed, mesh)
    params = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        host_params(boxed), param_sh)
    opt_sh = sharding.optimizer_state_shardings(tx, params, param_sh, zero=zero)
    state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params)}
    state_sh = {"params": param_sh, "opt_state": opt_sh}

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {"loss": loss}

    step = sharding.jit_train_step(train_step, mesh, state_sh, sharding.batch_sharding(mesh))
    return mesh, state, state_sh, step


def train_losses(optimizer, mesh_spec, zero=0, steps=20, devices=None, compiler_options=None):
    """Per-step training losses of the tiny LM; each process feeds only its own rows. The
    step is compiled with XLA `compiler_options` (None: jit's defaults)."""
    mesh, state, _, step = setup(optimizer, mesh_spec, zero, devices)
    batches = [sharding.shard_batch(local_rows(global_batch(i)), mesh) for i in range(steps)]
    if compiler_options is not None:
        step = step.lower(state, batches[0]).compile(compiler_options)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def _assembled_batch_matches(mesh):
    """Whether the global array built from every process's rows is the full batch, in order."""
    batch = global_batch(0)
    arr = sharding.shard_batch(local_rows(batch), mesh)
    full = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(arr)
    return bool(np.array_equal(np.asarray(full.addressable_data(0)), batch))


def main(process_id, num_processes, port, out_path):
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id)
    result = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "batch_in_order": _assembled_batch_matches(sharding.make_mesh("data=2,fsdp=2,tensor=2")),
        "runs": [[opt, spec, zero, train_losses(opt, spec, zero)]
                 for opt, spec, zero in MULTIHOST_RUNS],
    }
    if process_id == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
