r"""Memory and communication of parallel training: formulas against compiled programs.

Nothing here needs real accelerators: memory (XLA's memory analysis) and communication (the
collectives in the optimized HLO, `sharding.hlo`) are properties of the compiled program,
so 8 emulated CPU devices give the numbers an 8-GPU host would (timing them would measure
nothing). Each table puts a formula of `sharding.accounting` beside the compiled number and
their ratio (compiled / formula):

- `--what=activations`: bytes one transformer layer keeps for the backward pass
  (Korthikanti et al. 2022), per layer: the slope of the compiled value-and-grad's
  temporaries over `--layers` (remat none), and of the residuals a compiled forward pass
  hands to the backward pass (remat block and dots: what jax keeps).
- `--what=remat`: for remat block and dots at the deeper of `--layers`: the memory saving
  none / remat (formula: stored bytes per layer; compiled: the value-and-grad's
  temporaries) and the FLOPs remat / none (formula: HFU / MFU, `hardware_flops_per_token`
  over `flops_per_token`; compiled: XLA's cost analysis).
- `--what=remat_every`: checkpointing every n blocks (remat block, `remat_every=n`, Chen et
  al. 2016) for a model of `--depth` layers, at each n dividing it: the inputs kept for the
  backward pass (formula: L / n block inputs; compiled: the forward's residuals), the peak
  of stored activations (formula: L / n inputs + the n layers of the segment recomputed in
  the backward pass; compiled: the value-and-grad's temporaries) and the FLOPs against
  remat none (formula: HFU / MFU, one forward pass of the blocks again at every n;
  compiled: XLA's cost analysis), with the formula's optimum sqrt(L input / layer).
- `--what=comm`: bytes each device sends per train step: data parallel and ZeRO-1/2/3 on
  data=8 (mixed precision: fp16 params and gradients), Megatron tensor parallelism on
  data=2,tensor=4, GPipe point-to-point on stage=4.
- `--what=zero`: per-device bytes of params, gradients and AdamW state for ZeRO stages
  0-3 on `--mesh` (default data=8) for an `experiments/configs/lm.py` variant (default
  124m), from the shard shapes of the shardings `sharding` gives them (nothing is
  allocated); `--precision=mixed` counts fp16 params and gradients with fp32 master
  weights in the optimizer state (the paper's 2 + 2 + 12 bytes). With `--compile`, also
  XLA's memory analysis of the compiled train step (per device: arguments + outputs less
  the donated aliases, and temporaries) at `--rows` x seq_len tokens.
- `--what=offload`: the state bytes a compiled train step keeps in device memory and in
  host memory ("pinned_host") for each `--offloads` setting (ZeRO-1, mixed precision),
  against `device_state_bytes`.
- `--what=bubble`: compiles a pipelined train step (the tables' model with `--stages`
  layers, `--stages` stages on as many devices) for each `--microbatches` M and reads the number of ticks of its schedule
  loop from the compiled HLO; each stage is busy in M of them, so the bubble fraction is
  (ticks - M) / ticks, which GPipe predicts as (S - 1) / (M + S - 1).

    python -m ravine.experiments.benchmarks.bench_parallel --what=activations
    python -m ravine.experiments.benchmarks.bench_parallel --what=remat_every --depth=16
    python -m ravine.experiments.benchmarks.bench_parallel --what=comm
    python -m ravine.experiments.benchmarks.bench_parallel --what=zero --compile --rows=8
    python -m ravine.experiments.benchmarks.bench_parallel --what=bubble --stages=4 --microbatches=4,8,16

Every table function returns its rows (`Row`), so tests/test_accounting_hlo.py checks the
same numbers the tables print.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from ravine import models  # noqa: E402
from ravine import optim  # noqa: E402
from ravine import sharding  # noqa: E402
from ravine.experiments.configs import lm  # noqa: E402
from ravine.experiments.runtime import cli, train_lib  # noqa: E402
from ravine.experiments.runtime import setup as run_setup  # noqa: E402
from ravine.models import pipeline  # noqa: E402
from ravine.models.transformer import GATED_MLPS  # noqa: E402
from ravine.sharding import accounting, hlo  # noqa: E402

# Its own FlagValues: the tests call `main` in a process that imports other benchmarks,
# whose flags (--d_model, --variant) share names with these.
FLAGS = flags.FlagValues()
WHATS = ("activations", "remat", "remat_every", "comm", "zero", "offload", "bubble")
_WHAT = flags.DEFINE_enum("what", "zero", WHATS, "Which table to print.", flag_values=FLAGS)
_VARIANT = flags.DEFINE_string("variant", "124m", "lm config variant (zero table).",
                               flag_values=FLAGS)
_MESH = flags.DEFINE_string("mesh", "data=8", "Mesh of the zero table.", flag_values=FLAGS)
_PRECISION = flags.DEFINE_enum("precision", "fp32", list(accounting.PRECISIONS),
                               "zero table: fp32 params and gradients (the config's), or "
                               "mixed: fp16 params and gradients, fp32 master weights.",
                               flag_values=FLAGS)
_COMPILE = flags.DEFINE_bool("compile", False, "Also compile each ZeRO train step and print "
                             "XLA's per-device memory analysis.", flag_values=FLAGS)
_ROWS = flags.DEFINE_integer("rows", 8, "Global rows per step (zero --compile, activations, "
                             "remat, comm, offload).", flag_values=FLAGS)
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Width of the model of the activations, "
                                "remat, comm and offload tables.", flag_values=FLAGS)
_LAYERS = flags.DEFINE_list("layers", ["2", "4"], "Two depths: the per-layer bytes are the "
                            "slope between them (activations, remat).", flag_values=FLAGS)
_DEPTH = flags.DEFINE_integer("depth", 16, "Layers L of the remat_every table (n runs over "
                                "the divisors of L).", lower_bound=1, flag_values=FLAGS)
_COMPUTE = flags.DEFINE_list("compute", ["float32", "bfloat16"], "Compute dtypes of the "
                              "activations table (params float32).", flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length of the activations, remat, "
                                "comm and offload tables.", flag_values=FLAGS)
_OFFLOADS = flags.DEFINE_list("offloads", ["none", "optimizer_state", "params",
                                            "params+optimizer_state"],
                               "Offload settings of the offload table: trees joined by '+'.",
                               flag_values=FLAGS)
_STAGES = flags.DEFINE_integer("stages", 4, "Pipeline stages (bubble, comm tables).",
                               flag_values=FLAGS)
_MICRO = flags.DEFINE_list("microbatches", ["4", "8", "16"], "Micro-batch counts M.",
                           flag_values=FLAGS)
_DEVICES = flags.DEFINE_integer("devices", 8, "Emulated CPU devices.", flag_values=FLAGS)

MB = 2 ** 20
# The tables read what XLA's HLO passes decide (buffer assignment, collectives, cost
# analysis); LLVM's optimisation of the machine code changes none of it (measured: equal
# memory analysis, collectives and FLOPs) and is half of a CPU compile's time.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                    "xla_llvm_disable_expensive_passes": True}
FP32 = "params=float32,compute=float32,output=float32"
# The ZeRO paper's mixed precision: fp16 params and gradients (fp32 master weights in the
# optimizer state, `with_fp32_master`). fp16 rather than bf16: XLA:CPU (jaxlib 0.10.2) keeps
# fp16 collectives as they are, but converts bf16 ones to fp32 and aborts the process
# (hlo_instruction.cc: "Invalid binary instruction opcode copy") compiling the bf16 ZeRO-2/3
# step.
HALF = "params=float16,compute=float16,output=float32"


class Row(NamedTuple):
    """One line of a table: a formula's value, the compiled program's, and what they are."""
    name: str
    formula: float
    compiled: float
    note: str = ""

    @property
    def ratio(self) -> float:
        if not self.formula:
            return 1.0 if not self.compiled else math.inf
        return self.compiled / self.formula


def _number(x):
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3f}"


def print_rows(rows, unit="bytes", scale=1):
    print(f"| | formula ({unit}) | compiled ({unit}) | compiled / formula | |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row.name} | {_number(row.formula / scale)} | "
              f"{_number(row.compiled / scale)} | {row.ratio:.3f} | {row.note} |", flush=True)


def small_config(d_model=128, n_layers=2, seq_len=128, policy=FP32, **overrides):
    """The model of the activations / remat / comm / offload / bubble tables: GPT-like (GeLU
    MLP of width 4 d_model, as in the formulas' papers), head dim 8, 256-token vocab."""
    fields = dict(vocab_size=256, d_model=d_model, n_layers=n_layers,
                  n_heads=max(1, d_model // 8), d_ff=4 * d_model, max_len=seq_len,
                  mlp="gelu", policy=policy)
    return models.TransformerConfig(**{**fields, **overrides})


def _param_shapes(config, model=None):
    model = model or models.Transformer(config)
    tokens = jnp.zeros((1, config.max_len), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def _lm_loss(config):
    return train_lib.lm_loss(models.Transformer(config))


def _tokens(rows, seq_len, sharding_=None):
    return jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32, sharding=sharding_)


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --- activations and remat -----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _value_and_grad(config, rows):
    """Compiled single-device value-and-grad of the LM loss (cached: the tables and the
    tests share compiled programs)."""
    params = nn.unbox(_param_shapes(config))
    return jax.jit(jax.value_and_grad(_lm_loss(config))).lower(
        params, _tokens(rows, config.max_len)).compile(COMPILER_OPTIONS)


@functools.lru_cache(maxsize=None)
def _residuals(config, rows):
    """Compiled forward pass returning jax's residuals (`jax.vjp`'s closure): the bytes
    it hands to the backward pass, less the params (which the backward also reads)."""
    params = nn.unbox(_param_shapes(config))
    loss = _lm_loss(config)

    def forward(p, tokens):
        return jax.vjp(lambda p: loss(p, tokens), p)[1]

    lowered = jax.jit(forward).lower(params, _tokens(rows, config.max_len))
    compiled = lowered.compile(COMPILER_OPTIONS)
    return compiled.memory_analysis().output_size_in_bytes - _nbytes(params)


def _per_layer(measure, config, rows, layers):
    """The slope of `measure(config at L layers, rows)` between the two depths `layers`."""
    low, high = layers
    values = [measure(dataclasses.replace(config, n_layers=n), rows) for n in (low, high)]
    return (values[1] - values[0]) / (high - low)


def _temporaries(config, rows):
    """XLA's temporaries of the compiled value-and-grad: activations and gradients."""
    return _value_and_grad(config, rows).memory_analysis().temp_size_in_bytes


def layer_formula(config, rows, remat, value_bytes, softmax_bytes=4):
    """`activation_bytes_per_layer` for a ravine `Transformer(config)` (no dropout; the
    attention softmax in float32, as `models.attention` computes it)."""
    return accounting.activation_bytes_per_layer(
        config.max_len, rows, config.d_model, config.n_heads,
        recompute=accounting.REMAT_POLICY[remat], d_ff=config.ff_dim,
        gated=config.mlp in GATED_MLPS, value_bytes=value_bytes, softmax_bytes=softmax_bytes,
        dropout=False)


def activation_rows(config, rows, layers=(2, 4)):
    """Per-layer activation bytes: formula vs compiled (see the module docstring).

    remat none: the value-and-grad's temporaries (what XLA:CPU keeps, float32 values: it
    runs bf16 matmuls in float32); block and dots: the compiled forward's residuals in the
    compute dtype (what jax hands the backward pass; XLA:CPU's fused value-and-grad does not
    keep this saving, see `remat_rows`).
    """
    compute_bytes = jnp.dtype(models.get_policy(config.policy).compute_dtype).itemsize
    none = dataclasses.replace(config, remat="none")
    out = [Row("remat=none: value-and-grad temporaries", layer_formula(none, rows, "none", 4),
               _per_layer(_temporaries, none, rows, layers), "float32 values")]
    for remat in ("block", "dots"):
        c = dataclasses.replace(config, remat=remat)
        out.append(Row(f"remat={remat}: forward residuals",
                       layer_formula(c, rows, remat, compute_bytes),
                       _per_layer(_residuals, c, rows, layers),
                       f"{compute_bytes}-byte values"))
    return out


def remat_rows(config, rows):
    """For each remat, at `config.n_layers`: the memory saving none / remat (formula: bytes
    stored per layer; compiled: the value-and-grad's temporaries) and the FLOPs remat / none
    (formula: `models.accounting.hardware_flops_per_token` over `flops_per_token`, i.e.
    HFU / MFU; compiled: XLA's cost analysis, which also counts elementwise work)."""
    def compiled(remat):
        return _value_and_grad(dataclasses.replace(config, remat=remat), rows)

    none = compiled("none")
    model_flops = models.flops_per_token(config)
    out = []
    for remat in models.transformer.REMATS[1:]:
        c = dataclasses.replace(config, remat=remat)
        out.append(Row(f"remat={remat}: memory none / {remat}",
                       layer_formula(config, rows, "none", 4) / layer_formula(c, rows, remat, 4),
                       none.memory_analysis().temp_size_in_bytes
                       / compiled(remat).memory_analysis().temp_size_in_bytes))
        out.append(Row(f"remat={remat}: FLOPs {remat} / none (HFU / MFU)",
                       models.accounting.hardware_flops_per_token(c) / model_flops,
                       compiled(remat).cost_analysis()["flops"] / none.cost_analysis()["flops"]))
    return out


class EveryRows(NamedTuple):
    """`remat_every_rows` at one segment length n: three rows, formula against compiled."""
    every: int
    inputs: Row    # block inputs kept beyond one: (L / n - 1) inputs vs forward residuals
    peak: Row      # L / n inputs + n layers vs the value-and-grad's temporaries
    flops: Row     # HFU / MFU vs compiled FLOPs over remat none's


def remat_every_rows(config, rows):
    """Checkpointing every n blocks (Chen et al. 2016) for each n dividing `config.n_layers`
    (remat block, `remat_every=n`), float32 values (see the module docstring).

    - inputs: the block inputs the forward pass keeps beyond the last segment's, `(L / n - 1)`
      inputs (`layer_formula(..., "block", 4)`) against the compiled forward's residuals less
      those at n = L (which keep one input and what the embedding, head and loss keep).
    - peak: `sharding.accounting.checkpointed_activation_bytes`, L / n inputs + n layers
      (`layer_formula(..., "none", 4)`) against the value-and-grad's temporaries. XLA:CPU
      keeps the forward's values whatever the remat (`remat_rows`), so the compiled column
      is remat none's at every n: on CPU only the formula's L / n term can be checked (by
      the inputs row).
    - flops: `hardware_flops_per_token / flops_per_token` (one forward pass of the blocks
      recomputed, at every n) against XLA's cost analysis over remat none's.
    """
    layers = config.n_layers
    none = _value_and_grad(dataclasses.replace(config, remat="none", remat_every=1), rows)
    none_flops = none.cost_analysis()["flops"]
    layer = layer_formula(config, rows, "none", 4)
    inputs = layer_formula(config, rows, "block", 4)
    segments = {n: dataclasses.replace(config, remat="block", remat_every=n)
                for n in range(1, layers + 1) if layers % n == 0}
    one_segment = _residuals(segments[layers], rows)
    model_flops = models.flops_per_token(config)
    out = []
    for n, c in segments.items():
        compiled = _value_and_grad(c, rows)
        out.append(EveryRows(
            n,
            Row(f"n={n}: inputs kept beyond one", (layers // n - 1) * inputs,
                _residuals(c, rows) - one_segment),
            Row(f"n={n}: peak", accounting.checkpointed_activation_bytes(layers, layer,
                                                                        inputs, n),
                compiled.memory_analysis().temp_size_in_bytes),
            Row(f"n={n}: FLOPs / remat none",
                models.accounting.hardware_flops_per_token(c) / model_flops,
                compiled.cost_analysis()["flops"] / none_flops)))
    return out


# --- ZeRO train steps (memory, communication, offload) --------------------------------------

class MasterState(NamedTuple):
    """State of `with_fp32_master`: float32 copies of the params and the inner state."""
    master: Any
    inner: Any


def with_fp32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on float32 master copies of low-precision params (mixed precision).

    The state holds the float32 params and `inner`'s state (Micikevicius et al. 2018); the
    update is the step from the current params to the new master params, so
    `optax.apply_updates` rounds the master params to the params' dtype. With AdamW this is
    the ZeRO paper's mixed-precision Adam: K = 12 bytes of optimizer state per param.
    """
    def init(params):
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return MasterState(master, inner.init(master))

    def update(grads, state, params):
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        updates = jax.tree.map(lambda m, p: m - p.astype(jnp.float32), master, params)
        return updates, MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


def state_layout(boxed, tx, mesh, zero, offload=()):
    """`(abstract state, state shardings, gradient shardings)` of a `TrainState` around the
    params `boxed` (shapes with logical axis names), laid out as the train job lays it out
    (`setup.train_state_layout`)."""
    params = nn.unbox(boxed)
    abstract = jax.eval_shape(lambda p: train_lib.init_state(p, tx, optim.NoOpLossScale()),
                              params)
    state, state_sh = run_setup.train_state_layout(abstract, boxed, tx, mesh, zero, offload)
    param_sh = sharding.param_shardings_for_zero(   # in device memory, whatever `offload` is
        params, sharding.logical_to_shardings(boxed, mesh), zero)
    return state, state_sh, sharding.gradient_shardings(params, param_sh, zero)


def compile_train_step(config, mesh, zero, rows, tx=None, offload=(), model=None,
                       boxed=None):
    """The compiled train step (`train_lib.make_train_step`, as the train job wires it) of
    `Transformer(config)` (or `model`) at ZeRO stage `zero` on `mesh`; nothing allocated.

    Returns:
      `(compiled, abstract_state)`.
    """
    model = model or models.Transformer(config)
    tx = tx or optim.adamw(1e-3, weight_decay=0.1)
    boxed = _param_shapes(config, model) if boxed is None else boxed
    state, state_sh, grad_sh = state_layout(boxed, tx, mesh, zero, offload)
    loss_fn = sharding.with_sharded_gradients(train_lib.lm_loss(model), state_sh.params,
                                              grad_sh)
    step = train_lib.make_train_step(loss_fn, tx, lambda count: 0.0)
    batch_sh = sharding.batch_sharding(mesh, batch_dim=1)
    batch = jax.ShapeDtypeStruct((1, rows, config.max_len + 1), jnp.int32, sharding=batch_sh)
    jitted = sharding.jit_train_step(step, mesh, state_sh, batch_sh)
    return jitted.lower(state, batch).compile(COMPILER_OPTIONS), state


def _per_device_bytes(shapes, shardings):
    """Bytes one device holds of `shapes` laid out as `shardings` (from the shard shapes)."""
    return sum(x.dtype.itemsize * math.prod(s.shard_shape(x.shape))
               for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def _mixed(config):
    return dataclasses.replace(config, policy=HALF), with_fp32_master(
        optim.adamw(1e-3, weight_decay=0.1))


@functools.lru_cache(maxsize=None)
def zero_step(config, mesh_spec, zero, rows, precision="fp32", offload=()):
    """`compile_train_step` of `Transformer(config)` with AdamW on `make_mesh(mesh_spec)`;
    `precision="mixed"`: fp16 params (the config's policy replaced) and fp32 master weights
    (`with_fp32_master`). Cached by its (hashable) arguments.

    Returns:
      `(compiled, abstract_state, config)`: the config as compiled.
    """
    if precision == "mixed":
        config, tx = _mixed(config)
    else:
        tx = optim.adamw(1e-3, weight_decay=0.1)
    compiled, state = compile_train_step(config, sharding.make_mesh(mesh_spec), zero, rows,
                                         tx, offload)
    return compiled, state, config


ZERO_COMM_NOTES = {
    0: "gradients all-reduced",
    1: "GSPMD all-reduces the gradients and slices them (no reduce-scatter on XLA:CPU), "
       "then all-gathers the params",
    2: "reduce-scatter + all-gather",
    3: "params gathered once: the backward pass keeps the forward's gathered copies",
}


def zero_comm_rows(config, rows, mesh_spec="data=8"):
    """Bytes each device sends per step at ZeRO 0-3 (mixed precision): formula vs HLO."""
    psi = models.count_params(_param_shapes(config))
    n = sharding.make_mesh(mesh_spec).shape[sharding.DATA]
    out = []
    for zero in sharding.ZERO_STAGES:
        step = zero_step(config, mesh_spec, zero, rows, "mixed")[0]
        found = hlo.collectives(step.as_text())
        ops = sorted({c.op for c in found if c.result_bytes >= 64})
        out.append(Row(f"zero={zero} ({' + '.join(ops)})",
                       accounting.zero_comm_bytes(psi, zero, n, value_bytes=2),
                       hlo.sent_bytes(found), ZERO_COMM_NOTES[zero]))
    return out


def tensor_comm_rows(config, rows, mesh_spec="data=2,tensor=4"):
    """Megatron tensor parallelism: the tensor group's bytes per device and step."""
    mesh = sharding.make_mesh(mesh_spec)
    t, data = mesh.shape[sharding.TENSOR], mesh.shape[sharding.DATA]
    step = zero_step(config, mesh_spec, 0, rows)[0]
    found = [c for c in hlo.collectives(step.as_text()) if c.group_size == t]
    value_bytes = jnp.dtype(models.get_policy(config.policy).compute_dtype).itemsize
    formula = accounting.tensor_parallel_comm_bytes(
        config.max_len, rows // data, config.d_model, t, config.n_layers, value_bytes)
    return [Row(f"tensor={t}, {config.n_layers} layers", formula, hlo.sent_bytes(found),
                "6 all-reduces of [s, b, h] per layer (Q, K, V input gradients apart) + "
                "embedding and head; Megatron: 4")]


def pipeline_comm_rows(config, rows, stages=4, microbatches=4):
    """GPipe on stage=S: the point-to-point bytes (collective-permutes) per stage."""
    step = compile_pipeline_step(config, stages, microbatches, rows)
    found = hlo.collectives(step.as_text())
    value_bytes = jnp.dtype(models.get_policy(config.policy).compute_dtype).itemsize
    formula = accounting.pipeline_comm_bytes(config.max_len, rows, config.d_model,
                                             value_bytes)
    return [Row(f"stage={stages}, M={microbatches}: collective-permute", formula,
                hlo.sent_bytes(found, "collective-permute"),
                f"ticks (M + S - 1) / M = {(microbatches + stages - 1) / microbatches:.3f}")]


@functools.lru_cache(maxsize=None)
def compile_pipeline_step(config, stages, microbatches, rows):
    """Compiled SGD step of `Transformer(config)`'s blocks pipelined over stage=`stages`."""
    boxed = pipeline.stack_blocks(_param_shapes(config))
    params = nn.unbox(boxed)
    mesh = sharding.make_mesh({"stage": stages}, jax.devices()[:stages])
    tx = pipeline.per_layer(optax.sgd(0.1))

    def loss_fn(p, tokens):
        logits = pipeline.apply(config, p, tokens[:, :-1], microbatches=microbatches)
        return models.cross_entropy(logits, tokens[:, 1:])

    def step(params, tokens):
        grads = jax.grad(loss_fn)(params, tokens)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    param_sh = sharding.logical_to_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            params, param_sh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        tokens = _tokens(rows, config.max_len, sharding.batch_sharding(mesh))
        return jax.jit(step).lower(abstract, tokens).compile(COMPILER_OPTIONS)


def comm_table():
    config = small_config(_D_MODEL.value, int(_LAYERS.value[0]), _SEQ_LEN.value)
    print(f"Bytes each device sends per train step (ring algorithms), d_model "
          f"{config.d_model}, {config.n_layers} layers, {_ROWS.value} x {config.max_len} "
          f"tokens (jax {jax.__version__}, {jax.devices()[0].platform})")
    rows = zero_comm_rows(config, _ROWS.value)
    rows += tensor_comm_rows(config, _ROWS.value)
    pipelined = dataclasses.replace(config, n_layers=_STAGES.value)
    rows += pipeline_comm_rows(pipelined, _ROWS.value, _STAGES.value, _STAGES.value)
    print_rows(rows, "MiB", MB)


def zero_memory_rows(config, rows, mesh_spec="data=8"):
    """Mixed-precision state bytes per device by ZeRO stage: formula (2 + 2 + 12) Psi split
    vs the compiled step's arguments (params + optimizer state; the batch subtracted)."""
    psi = models.count_params(_param_shapes(config))
    n = sharding.make_mesh(mesh_spec).shape[sharding.DATA]
    out = []
    for zero in sharding.ZERO_STAGES:
        step = zero_step(config, mesh_spec, zero, rows, "mixed")[0]
        batch = rows // n * (config.max_len + 1) * 4
        expected = accounting.zero_state_bytes(psi, zero, n, "mixed")
        arguments = step.memory_analysis().argument_size_in_bytes - batch
        out.append(Row(f"zero={zero}: params + optimizer state",
                       expected.params + expected.optimizer_state, arguments))
    return out


def zero_table():
    config = lm.get_config(_VARIANT.value)
    precision = _PRECISION.value
    policy = config.precision if precision == "fp32" else HALF
    model_config = models.TransformerConfig(
        vocab_size=256, max_len=config.seq_len, policy=policy,
        **{k: v for k, v in config.model.to_dict().items() if v is not None and k != "max_len"})
    model = models.Transformer(model_config)
    mesh = sharding.make_mesh(_MESH.value)
    boxed = _param_shapes(model_config, model)
    params = nn.unbox(boxed)
    tx = optim.adamw(config.optimizer.learning_rate, weight_decay=0.1)
    if precision == "mixed":
        tx = with_fp32_master(tx)
    n = models.count_params(params)
    data = mesh.shape[sharding.DATA]
    bytes_ = accounting.PRECISIONS[precision]
    print(f"{_VARIANT.value}: {n / 1e6:.1f}M params (Psi), {precision} "
          f"({bytes_[0]} + {bytes_[1]} + {bytes_[2]} bytes per param), AdamW, mesh "
          f"{_MESH.value} (N = data = {data}); MiB per device")
    header = (f"| zero | params | grads | AdamW state | total | formula "
              f"({' + '.join(map(str, bytes_))})Psi split |")
    if _COMPILE.value:
        header += " compiled: state in+out | compiled: temporaries |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for zero in sharding.ZERO_STAGES:
        state, state_sh, grad_sh = state_layout(boxed, tx, mesh, zero)
        sizes = [_per_device_bytes(params, state_sh.params), _per_device_bytes(params, grad_sh),
                 _per_device_bytes(state.opt_state, state_sh.opt_state)]
        formula = accounting.zero_state_bytes(n, zero, data, precision).total
        row = (f"| {zero} | {sizes[0] / MB:.0f} | {sizes[1] / MB:.0f} | {sizes[2] / MB:.0f} "
               f"| {sum(sizes) / MB:.0f} | {formula / MB:.0f} |")
        if _COMPILE.value:
            compiled, _ = compile_train_step(model_config, mesh, zero, _ROWS.value, tx, model=model,
                                             boxed=boxed)
            memory = compiled.memory_analysis()
            resident = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        - memory.alias_size_in_bytes)   # the donated state is counted once
            row += f" {resident / MB:.0f} | {memory.temp_size_in_bytes / MB:.0f} |"
        print(row, flush=True)
    if precision == "mixed":
        paper = [accounting.zero_state_bytes(7.5e9, z, 64).total / accounting.GB
                 for z in sharding.ZERO_STAGES]
        print("\nThe paper's 7.5B model on 64 GPUs, by the same formula (GB per device): "
              + " / ".join(f"{x:.1f}" for x in paper))


def activations_table():
    layers = tuple(map(int, _LAYERS.value))
    for compute in _COMPUTE.value:
        policy = f"params=float32,compute={compute},output=float32"
        config = small_config(_D_MODEL.value, layers[0], _SEQ_LEN.value, policy)
        print(f"\nBytes per layer kept for the backward pass, d_model {config.d_model}, "
              f"{config.n_heads} heads, GeLU MLP 4 d_model, {_ROWS.value} x {config.max_len} "
              f"tokens, {policy} (slope over {layers[0]} -> {layers[1]} layers)")
        print_rows(activation_rows(config, _ROWS.value, layers), "KiB", 1024)


def remat_table():
    config = small_config(_D_MODEL.value, int(_LAYERS.value[1]), _SEQ_LEN.value)
    print(f"What remat saves and costs, compiled value-and-grad (float32), d_model "
          f"{config.d_model}, {config.n_layers} layers, {_ROWS.value} x {config.max_len} "
          f"tokens")
    print("| | formula | compiled | compiled / formula | |")
    print("|---|---:|---:|---:|---|")
    for row in remat_rows(config, _ROWS.value):
        print(f"| {row.name} | {row.formula:.3f} | {row.compiled:.3f} | {row.ratio:.3f} | |")


def remat_every_table():
    config = small_config(_D_MODEL.value, _DEPTH.value, _SEQ_LEN.value)
    layers, rows = config.n_layers, _ROWS.value
    layer = layer_formula(config, rows, "none", 4)
    inputs = layer_formula(config, rows, "block", 4)
    best = accounting.optimal_checkpoint_every(layers, layer, inputs)
    best_divisor = min((n for n in range(1, layers + 1) if layers % n == 0),
                       key=lambda n: accounting.checkpointed_activation_bytes(
                           layers, layer, inputs, n))
    print(f"Checkpointing every n blocks (remat=block, remat_every=n), compiled value-and-grad "
          f"(float32), d_model {config.d_model}, L = {layers} layers, {rows} x "
          f"{config.max_len} tokens (jax {jax.__version__}, {jax.devices()[0].platform}); KiB")
    print(f"A layer keeps {layer / inputs:.0f}x its input (formula), so the formula's optimum "
          f"is sqrt(L input / layer) = {math.sqrt(layers * inputs / layer):.2f} (n = "
          f"{best:g} in [1, L]; n = {best_divisor} among the divisors); Chen et al.'s sqrt(L) = "
          f"{math.sqrt(layers):.2f} is the optimum of the last column, layers that keep only "
          f"their input (L / n + n inputs).")
    print("| n | kept inputs beyond one: formula | compiled (forward residuals) | ratio "
          "| peak, L/n inputs + n layers: formula | compiled (temporaries) | ratio "
          "| FLOPs / remat none: formula (HFU/MFU) | compiled | ratio | Chen: L/n + n |")
    print("|---:|" + "---:|" * 10)
    for every, *cells in remat_every_rows(config, rows):
        line = f"| {every} |"
        for row, scale in zip(cells, (1024, 1024, 1)):
            line += (f" {_number(row.formula / scale)} | {_number(row.compiled / scale)} | "
                     f"{row.ratio:.3f} |")
        print(f"{line} {layers // every + every} |", flush=True)
    none = _temporaries(dataclasses.replace(config, remat="none"), rows)
    print(f"remat=none: formula L layers {_number(layers * layer / 1024)} KiB, compiled "
          f"temporaries {_number(none / 1024)} KiB (XLA:CPU keeps the forward's values at "
          f"every remat: the peak column is flat)")


OFFLOADS = ((), ("optimizer_state",), ("params",), ("params", "optimizer_state"))


def offload_rows(config, rows, mesh_spec="data=8", settings=OFFLOADS):
    """For each offload setting (ZeRO-1, mixed precision): the state bytes per device the
    compiled step takes from device memory (its entry layout without a host memory space,
    the batch subtracted) vs `device_state_bytes` of params + optimizer state (the gradients
    are temporaries of the step, not state)."""
    n = sharding.make_mesh(mesh_spec).shape[sharding.DATA]
    psi = models.count_params(_param_shapes(config))
    state = accounting.zero_state_bytes(psi, 1, n, "mixed")
    out = []
    for offload in settings:
        compiled = zero_step(config, mesh_spec, 1, rows, "mixed", tuple(offload))[0]
        device, host = entry_bytes_by_memory(compiled.as_text())
        batch = rows // n * (config.max_len + 1) * 4
        formula = accounting.device_state_bytes(state, tuple(offload) + ("gradients",))
        on_host = accounting.device_state_bytes(state, ("gradients",)) - formula
        out.append(Row(f"offload={','.join(offload) or 'none'}", formula, device - batch,
                       f"host: formula {on_host / 1024:.1f} KiB, compiled "
                       f"{host / 1024:.1f} KiB"))
    return out


def run_steps(config, rows, steps, mesh_spec="data=8", zero=1, precision="mixed",
              offload=()):
    """Losses of `steps` steps of `zero_step(...)`'s compiled program from fixed initial
    params and batches (numpy-made, so no RNG program is compiled), and the final state."""
    compiled, abstract, config = zero_step(config, mesh_spec, zero, rows, precision,
                                           tuple(offload))
    mesh = sharding.make_mesh(mesh_spec)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype),
                          abstract.params)
    tx = optim.adamw(1e-3, weight_decay=0.1)
    tx = with_fp32_master(tx) if precision == "mixed" else tx
    state = train_lib.init_state(params, tx, optim.NoOpLossScale())
    state = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), state, abstract)
    losses = []
    for i in range(steps):
        tokens = np.random.default_rng(i).integers(0, config.vocab_size,
                                                   (1, rows, config.max_len + 1))
        batch = sharding.shard_batch(tokens.astype(np.int32), mesh, batch_dim=1)
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def entry_bytes_by_memory(hlo_text):
    """(device bytes, host bytes) of a compiled module's parameters, from its entry layout:
    arrays in host memory carry memory space S(5) (XLA's kHostMemorySpace)."""
    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", hlo_text).group(1)
    device = host = 0
    for dtype, dims, tail in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]\{([^}]*)\}", layout):
        size = hlo.DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        if "S(5)" in tail:
            host += size
        else:
            device += size
    return device, host


def offload_table():
    config = small_config(_D_MODEL.value, int(_LAYERS.value[0]), _SEQ_LEN.value)
    print(f"State bytes per device the compiled step takes from device memory, ZeRO-1 on "
          f"data=8, fp16 params + fp32 master weights and AdamW state, d_model "
          f"{config.d_model}, {config.n_layers} layers")
    print_rows(offload_rows(config, _ROWS.value, settings=_offload_settings()), "KiB", 1024)


def _offload_settings():
    """--offloads as tuples of tree names; ValueError naming an unknown tree."""
    settings = [tuple(t for t in setting.split("+") if t != "none")
                for setting in _OFFLOADS.value]
    for tree in {t for setting in settings for t in setting}:
        if tree not in run_setup.OFFLOADABLE:
            raise ValueError(f"--offloads: {tree!r} is not 'none' or one of "
                             f"{list(run_setup.OFFLOADABLE)}")
    return settings


def bubble_table():
    stages = _STAGES.value
    config = small_config(_D_MODEL.value, stages, _SEQ_LEN.value)
    print(f"GPipe schedule of a compiled train step, S = {stages} stages "
          f"(jax {jax.__version__}, {jax.devices()[0].platform})")
    print("| M | ticks in the compiled loop | busy ticks per stage | bubble (ticks - M)/ticks "
          "| (S-1)/(M+S-1) |")
    print("|---|---|---|---|---|")
    for micro in map(int, _MICRO.value):
        rows = micro * max(1, _ROWS.value // micro)   # rows divisible by M
        hlo_text = compile_pipeline_step(config, stages, micro, rows).as_text()
        ticks = schedule_ticks(hlo_text, micro, stages)
        print(f"| {micro} | {ticks} | {micro} | {(ticks - micro) / ticks:.3f} "
              f"| {(stages - 1) / (micro + stages - 1):.3f} |", flush=True)


def schedule_ticks(hlo_text, microbatches, stages):
    """Trip count of the pipeline loops (the ones containing a collective-permute)."""
    counts = {c.count for c in hlo.collectives(hlo_text) if c.op == "collective-permute"}
    if len(counts) != 1 or None in counts:
        raise RuntimeError(f"expected one tick count for the pipeline loops, found {counts}")
    return counts.pop()


TABLES = {"activations": activations_table, "remat": remat_table,
          "remat_every": remat_every_table, "comm": comm_table,
          "zero": zero_table, "offload": offload_table, "bubble": bubble_table}


def main(argv):
    del argv
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    start = time.time()
    with cli.usage_errors():
        table = TABLES[_WHAT.value]
        layers = [int(n) for n in _LAYERS.value]
        if len(layers) != 2 or not 1 <= layers[0] < layers[1]:
            raise ValueError(f"--layers must be two increasing depths, got {_LAYERS.value}")
        _offload_settings()
    table()
    print(f"({time.time() - start:.0f} s)")


def parse_flags(argv):
    """Parses `argv` (the program's name first) into FLAGS; --help prints them and exits 0,
    a bad flag exits 2 with one line."""
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        print(__doc__.split("\n\n")[0] + "\n\n" + FLAGS.get_help())
        sys.exit(0)
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        cli.fail(error)
    if len(rest) > 1:
        cli.fail(f"unexpected arguments: {' '.join(rest[1:])}")


if __name__ == "__main__":
    parse_flags(sys.argv)
    main([])
