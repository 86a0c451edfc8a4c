r"""ZeRO memory per device and the GPipe bubble, read from shardings and compiled programs.

Neither needs real accelerators: both are properties of the program, so 8 emulated CPU
devices give the same numbers a GPU host would (timing them would measure nothing).

- `--what=zero`: per-device bytes of params, gradients and AdamW state for ZeRO stages
  0-3 on `--mesh` (default data=8) for an `experiments/configs/lm.py` variant (default
  124m), from the shard shapes of the shardings `sharding` gives them (nothing is
  allocated). With `--compile`, also XLA's memory analysis of the compiled train step
  (per device: arguments + outputs less the donated aliases, and temporaries) at
  `--rows` x seq_len tokens.
- `--what=bubble`: compiles a pipelined train step (tiny model, `--stages` stages on as
  many devices) for each `--microbatches` M and reads the number of ticks of its schedule
  loop from the compiled HLO; each stage is busy in M of them, so the bubble fraction is
  (ticks - M) / ticks, which GPipe predicts as (S - 1) / (M + S - 1).

    python -m ravine.experiments.benchmarks.bench_parallel --what=zero
    python -m ravine.experiments.benchmarks.bench_parallel --what=zero --compile --rows=8
    python -m ravine.experiments.benchmarks.bench_parallel --what=bubble --stages=4 --microbatches=4,8,16
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from ravine import models  # noqa: E402
from ravine import optim  # noqa: E402
from ravine import sharding  # noqa: E402
from ravine.experiments.runtime import cli, train_lib  # noqa: E402
from ravine.experiments.runtime.state import TrainState  # noqa: E402
from ravine.experiments.configs import lm  # noqa: E402
from ravine.models import pipeline  # noqa: E402

_WHAT = flags.DEFINE_enum("what", "zero", ["zero", "bubble"], "Which table to print.")
_VARIANT = flags.DEFINE_string("variant", "124m", "lm config variant (zero table).")
_MESH = flags.DEFINE_string("mesh", "data=8", "Mesh of the zero table.")
_COMPILE = flags.DEFINE_bool("compile", False, "Also compile each ZeRO train step and print "
                             "XLA's per-device memory analysis.")
_ROWS = flags.DEFINE_integer("rows", 8, "Global rows per step for --compile.")
_STAGES = flags.DEFINE_integer("stages", 4, "Pipeline stages (bubble table).")
_MICRO = flags.DEFINE_list("microbatches", ["4", "8", "16"], "Micro-batch counts M.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Emulated CPU devices.")

MB = 2 ** 20


def _per_device_bytes(shapes, shardings):
    """Bytes one device holds of `shapes` laid out as `shardings` (from the shard shapes)."""
    return sum(x.dtype.itemsize * math.prod(s.shard_shape(x.shape))
               for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def zero_table():
    config = lm.get_config(_VARIANT.value)
    model_config = models.TransformerConfig(
        vocab_size=256, max_len=config.seq_len, policy=config.precision,
        **{k: v for k, v in config.model.to_dict().items() if v is not None and k != "max_len"})
    model = models.Transformer(model_config)
    mesh = sharding.make_mesh(_MESH.value)
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    params = nn.unbox(boxed)
    tx = optim.adamw(config.optimizer.learning_rate, weight_decay=0.1)
    n = models.count_params(params)
    data = mesh.shape[sharding.DATA]
    print(f"{_VARIANT.value}: {n / 1e6:.1f}M params (Psi), fp32, AdamW, mesh {_MESH.value} "
          f"(N = data = {data}); MiB per device")
    header = "| zero | params | grads | AdamW state | total | paper (4+4+8)Psi split |"
    if _COMPILE.value:
        header += " compiled: state in+out | compiled: temporaries |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for zero in sharding.ZERO_STAGES:
        param_sh = sharding.param_shardings_for_zero(
            params, sharding.logical_to_shardings(boxed, mesh), zero)
        grad_sh = sharding.gradient_shardings(params, param_sh, zero)
        opt_sh = sharding.optimizer_state_shardings(tx, params, param_sh, zero)
        sizes = [_per_device_bytes(params, param_sh), _per_device_bytes(params, grad_sh),
                 _per_device_bytes(jax.eval_shape(tx.init, params), opt_sh)]
        paper = 4 * n * ((1 / data if zero >= 3 else 1) + (1 / data if zero >= 2 else 1)
                         + 2 * (1 / data if zero >= 1 else 1))
        row = (f"| {zero} | {sizes[0] / MB:.0f} | {sizes[1] / MB:.0f} | {sizes[2] / MB:.0f} "
               f"| {sum(sizes) / MB:.0f} | {paper / MB:.0f} |")
        if _COMPILE.value:
            resident, temporary = _compiled_bytes(model, tx, mesh, params, param_sh, grad_sh,
                                                  opt_sh, config)
            row += f" {resident / MB:.0f} | {temporary / MB:.0f} |"
        print(row, flush=True)


def _compiled_bytes(model, tx, mesh, params, param_sh, grad_sh, opt_sh, config):
    replicated = sharding.replicated(mesh)
    state_sh = TrainState(step=replicated, skipped=replicated, params=param_sh,
                          loss_scale=optim.NoOpLossScale(), opt_state=opt_sh)
    state = jax.eval_shape(lambda p: train_lib.init_state(p, tx, optim.NoOpLossScale()), params)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, state_sh)
    loss_fn = sharding.with_sharded_gradients(train_lib.lm_loss(model), param_sh, grad_sh)
    batch_sh = sharding.batch_sharding(mesh, batch_dim=1)
    batch = jax.ShapeDtypeStruct((1, _ROWS.value, config.seq_len + 1), jnp.int32,
                                 sharding=batch_sh)
    step = sharding.jit_train_step(train_lib.make_train_step(loss_fn, tx, lambda c: 0.0),
                                   mesh, state_sh, batch_sh)
    memory = step.lower(state, batch).compile().memory_analysis()
    resident = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes)       # the donated state is counted once
    return resident, memory.temp_size_in_bytes


def bubble_table():
    stages = _STAGES.value
    config = models.TransformerConfig(vocab_size=32, d_model=16, n_layers=stages, n_heads=2,
                                      d_ff=32, max_len=8)
    model = models.Transformer(config)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    boxed = pipeline.stack_blocks(boxed["params"])
    params = nn.unbox(boxed)
    mesh = sharding.make_mesh({"stage": stages}, jax.devices()[:stages])
    tx = pipeline.per_layer(optax.sgd(0.1))
    print(f"GPipe schedule of a compiled train step, S = {stages} stages "
          f"(jax {jax.__version__}, {jax.devices()[0].platform})")
    print("| M | ticks in the compiled loop | busy ticks per stage | bubble (ticks - M)/ticks "
          "| (S-1)/(M+S-1) |")
    print("|---|---|---|---|---|")
    for micro in map(int, _MICRO.value):
        def loss_fn(p, tokens, micro=micro):
            logits = pipeline.apply(config, p, tokens[:, :-1], microbatches=micro)
            return models.cross_entropy(logits, tokens[:, 1:])

        def step(params, tokens):
            grads = jax.grad(loss_fn)(params, tokens)
            updates, _ = tx.update(grads, tx.init(params), params)
            return optax.apply_updates(params, updates)

        param_sh = sharding.logical_to_shardings(boxed, mesh)
        tokens = jax.ShapeDtypeStruct((micro, 9), jnp.int32,
                                      sharding=sharding.batch_sharding(mesh))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                params, param_sh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            hlo = jax.jit(step).lower(abstract, tokens).compile().as_text()
        ticks = schedule_ticks(hlo, micro, stages)
        print(f"| {micro} | {ticks} | {micro} | {(ticks - micro) / ticks:.3f} "
              f"| {(stages - 1) / (micro + stages - 1):.3f} |", flush=True)


def schedule_ticks(hlo, microbatches, stages):
    """Trip count of the pipeline loops (the ones containing a collective-permute)."""
    counts = set()
    for name, trips in re.findall(r"while\(.*?body=(%?[\w.-]+).*?known_trip_count\":\{\"n\":\"(\d+)\"", hlo):
        body = re.search(rf"\n{re.escape(name)} .*?\n}}", hlo, re.S) or re.search(
            rf"{re.escape(name.lstrip('%'))}[ (].*?\n}}", hlo, re.S)
        if body and "collective-permute" in body.group(0):
            counts.add(int(trips))
    if len(counts) != 1:
        raise RuntimeError(f"expected one tick count for the pipeline loops, found {counts}")
    return counts.pop()


def main(argv):
    del argv
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    start = time.time()
    with cli.usage_errors():
        table = zero_table if _WHAT.value == "zero" else bubble_table
    table()
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    cli.run(main)
