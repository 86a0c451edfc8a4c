r"""Training throughput and model FLOPs utilisation (MFU) of `models.Transformer`.

For each width and precision it times a jitted train step (forward, backward, AdamW update;
state donated) and reports tokens/s and achieved FLOP/s = `models.flops_per_token` x tokens/s
(6N + attention, i.e. a training step counted as 3 forward passes; see models/accounting.py),
as a fraction of the machine's matmul peak measured in the same process: a jitted n x n x n
matmul in the same dtype, timed in rounds interleaved with the train step (best of each).

It also prints, from XLA's compiled memory analysis (no execution), the memory of a
value-and-grad step for each `remat` setting, and the temporary memory of causal attention
at T=2048 for "xla" against "chunked".

    python -m ravine.experiments.benchmarks.bench_model                          # CPU: d_model 256/512, fp32+bf16
    python -m ravine.experiments.benchmarks.bench_model --gpt2 --attention=cudnn # GPU: GPT-2 small (124M), bf16
    python -m ravine.experiments.benchmarks.bench_model --gpt2 --peak_tflops=989 # MFU against a datasheet peak
    python -m ravine.experiments.benchmarks.bench_model --d_models=64 --n_layers=1 --seq_len=32 --batch_size=2 \
        --steps=2 --rounds=1 --matmul_size=256 --memory_seq_len=256   # smoke test
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine.experiments.runtime import cli, timing

_D_MODELS = flags.DEFINE_list("d_models", ["256", "512"], "Model widths to benchmark.")
_PRECISIONS = flags.DEFINE_list("precisions", ["fp32", "bf16"],
                                "Compute dtypes (fp32, bf16, fp16); params and logits stay fp32.")
_N_LAYERS = flags.DEFINE_integer("n_layers", 4, "Transformer blocks.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Attention head width (n_heads = d / head_dim).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 256, "Vocabulary size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Training sequence length.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_MLP = flags.DEFINE_string("mlp", "swiglu", "swiglu or gelu.")
_ATTENTION = flags.DEFINE_string("attention", "xla", "xla, cudnn or chunked.")
_REMAT = flags.DEFINE_string("remat", "none", "none, block or dots.")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps timed per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds of (train steps, matmuls); "
                               "the best of each is reported.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 0, "n of the n x n x n peak matmul; 0 picks "
                                    "2048 on CPU and 8192 on accelerators.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "If > 0, MFU is taken against this peak "
                                  "(e.g. a datasheet number) instead of the measured matmul.")
_GPT2 = flags.DEFINE_bool("gpt2", False, "Benchmark a GPT-2-small-like 124M model in bf16 "
                          "(vocab 50304, d 768, 12 layers, 12 heads, T=1024) instead.")
_MEMORY = flags.DEFINE_bool("memory", True, "Print the compiled-memory tables (remat, attention).")
_MEMORY_SEQ_LEN = flags.DEFINE_integer("memory_seq_len", 2048, "T of the attention-memory table.")

COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class Setting:
    config: models.TransformerConfig
    precision: str
    batch_size: int
    seq_len: int


def _positive(name, value):
    if value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value}")
    return value


def settings_from_flags():
    """The benchmark settings; ValueError (-> exit 2) names a bad flag value."""
    for name in ("n_layers", "head_dim", "vocab_size", "seq_len", "batch_size", "steps",
                 "rounds", "memory_seq_len"):
        _positive(name, flags.FLAGS[name].value)
    if _MATMUL_SIZE.value < 0:
        raise ValueError(f"--matmul_size must be >= 0, got {_MATMUL_SIZE.value}")
    if _PEAK_TFLOPS.value < 0:
        raise ValueError(f"--peak_tflops must be >= 0, got {_PEAK_TFLOPS.value}")
    for precision in _PRECISIONS.value:
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"--precisions: unknown precision {precision!r}; "
                             f"known: {', '.join(COMPUTE_DTYPES)}")
    if _ATTENTION.value == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"--attention=cudnn needs a GPU; this backend is "
                             f"{jax.default_backend()}")
        if "fp32" in _PRECISIONS.value and not _GPT2.value:
            raise ValueError("--attention=cudnn needs bf16 or fp16: drop fp32 from --precisions")
    common = dict(remat=_REMAT.value, attention=_ATTENTION.value)
    if _GPT2.value:
        base = models.TransformerConfig(
            vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_len=1024, mlp="gelu",
            norm="layernorm", position="learned", tie_embeddings=True, **common)
        return [Setting(_with_precision(base, "bf16"), "bf16", _BATCH_SIZE.value, 1024)]
    settings = []
    for d_model in _D_MODELS.value:
        try:
            d_model = _positive("d_models", int(d_model))
        except ValueError:
            raise ValueError(f"--d_models: {d_model!r} is not a positive integer") from None
        if d_model % _HEAD_DIM.value:
            raise ValueError(f"--head_dim {_HEAD_DIM.value} does not divide d_model {d_model}")
        base = models.TransformerConfig(
            vocab_size=_VOCAB_SIZE.value, d_model=d_model, n_layers=_N_LAYERS.value,
            n_heads=d_model // _HEAD_DIM.value, max_len=_SEQ_LEN.value, mlp=_MLP.value, **common)
        for precision in _PRECISIONS.value:
            settings.append(Setting(_with_precision(base, precision), precision,
                                    _BATCH_SIZE.value, _SEQ_LEN.value))
    return settings


def _with_precision(config, precision):
    return dataclasses.replace(config, policy=f"p=f32,c={COMPUTE_DTYPES[precision]},o=f32")


def make_train_step(config):
    """Jitted init and LM train step `(params, opt_state), tokens -> (...), loss`, and the loss.

    AdamW (`optim.adamw`), decay on matrices only (`optim.decay_mask`).
    """
    model = models.Transformer(config)
    tx = optim.adamw(3e-4, weight_decay=0.1, mask=optim.decay_mask)

    def loss_fn(params, tokens):
        return models.cross_entropy(model.apply(params, tokens[:, :-1]), tokens[:, 1:])

    def step(state, tokens):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def init(key, tokens):
        params = nn.unbox(model.init(key, tokens[:, :-1]))
        return params, tx.init(params)

    return jax.jit(init), jax.jit(step, donate_argnums=0), loss_fn


def matmul_peak(dtype, size, reps):
    """A jitted function running `reps` n x n x n matmuls, its args and FLOPs per call."""
    a, b = (jax.random.normal(jax.random.key(i), (size, size), jnp.float32).astype(dtype)
            for i in range(2))
    scale = jnp.asarray(size ** -0.5, dtype)

    @jax.jit
    def chain(a, b):
        # Each product feeds the next, so XLA can neither skip nor merge them; the scale
        # keeps the entries O(1) (no fp16 overflow).
        return jax.lax.fori_loop(0, reps, lambda _, x: (x @ b) * scale, a)

    return chain, (a, b), 2.0 * size ** 3 * reps


def benchmark(setting, matmul_size):
    """(params, tokens/s, achieved FLOP/s, matmul FLOP/s) for one setting."""
    config = setting.config
    init, step, _ = make_train_step(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(config.vocab_size,
                                      size=(setting.batch_size, setting.seq_len + 1)), jnp.int32)
    state = init(jax.random.key(0), tokens)
    n_params = models.count_params(state[0])

    def run_steps(state):
        for _ in range(_STEPS.value):
            state, _ = step(state, tokens)
        return state

    dtype = jnp.dtype(COMPUTE_DTYPES[setting.precision])
    chain, matmul_args, matmul_flops = matmul_peak(dtype, matmul_size, reps=4)
    state, _ = step(state, tokens)  # compile
    jax.block_until_ready(chain(*matmul_args))
    best_steps = best_matmul = float("inf")
    for _ in range(_ROUNDS.value):
        state, seconds = timing.time_calls(run_steps, state, calls=1)
        best_steps = min(best_steps, seconds)
        best_matmul = min(best_matmul, timing.best_seconds(chain, *matmul_args, repeats=1,
                                                           warm_up=False))
    tokens_per_s = setting.batch_size * setting.seq_len * _STEPS.value / best_steps
    achieved = models.flops_per_token(config, setting.seq_len) * tokens_per_s
    return n_params, tokens_per_s, achieved, matmul_flops / best_matmul


def remat_memory_table(setting):
    """Compiled memory of value-and-grad for each remat setting (compile only)."""
    rows = []
    tokens = jax.ShapeDtypeStruct((setting.batch_size, setting.seq_len + 1), jnp.int32)
    for remat in models.transformer.REMATS:
        config = dataclasses.replace(setting.config, remat=remat)
        init, _, loss_fn = make_train_step(config)
        params = jax.eval_shape(init, jax.random.key(0), tokens)[0]
        stats = jax.jit(jax.value_and_grad(loss_fn)).lower(params, tokens).compile()
        stats = stats.memory_analysis()
        peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
        rows.append((remat, stats.temp_size_in_bytes, peak))
    return rows


def attention_memory_table(length, heads=4, head_dim=64):
    """Temporary memory of causal attention, forward and grad, per implementation."""
    shape = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
    rows = []
    for implementation in ("xla", "chunked"):
        def forward(q, k, v, implementation=implementation):
            return models.causal_attention(q, k, v, implementation).sum()

        temps = [jax.jit(fn).lower(shape, shape, shape).compile().memory_analysis()
                 .temp_size_in_bytes
                 for fn in (forward, jax.grad(forward, argnums=(0, 1, 2)))]
        rows.append((implementation, *temps))
    return rows


def mib(n_bytes):
    return f"{n_bytes / 2**20:.1f}"


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep jax's backend-probing INFO lines quiet
    with cli.usage_errors():
        settings = settings_from_flags()
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    matmul_size = _MATMUL_SIZE.value or (2048 if on_cpu else 8192)
    print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s); "
          f"jax {jax.__version__}")
    print(f"train step: batch x seq_len tokens, AdamW, attention={_ATTENTION.value}, "
          f"remat={_REMAT.value}; peak: {matmul_size}^3 matmul in the compute dtype\n")
    print("| d_model | layers | precision | params | tokens/s | TFLOP/s | matmul TFLOP/s | MFU |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for setting in settings:
        n_params, tokens_per_s, achieved, measured_peak = benchmark(setting, matmul_size)
        peak = _PEAK_TFLOPS.value * 1e12 or measured_peak
        config = setting.config
        print(f"| {config.d_model} | {config.n_layers} | {setting.precision} | "
              f"{n_params / 1e6:.1f}M | {tokens_per_s:,.0f} | {achieved / 1e12:.3f} | "
              f"{measured_peak / 1e12:.3f} | {achieved / peak:.1%} |", flush=True)
    if _PEAK_TFLOPS.value:
        print(f"\nMFU against the given peak of {_PEAK_TFLOPS.value} TFLOP/s.")
    if not _MEMORY.value:
        return
    setting = settings[-1]
    print(f"\nremat, d_model {setting.config.d_model}, {setting.precision}, batch "
          f"{setting.batch_size} x {setting.seq_len} (compiled value_and_grad):")
    print("| remat | temp MiB | peak MiB (args + outputs + temp) |")
    print("|---|---:|---:|")
    for remat, temp, peak in remat_memory_table(setting):
        print(f"| {remat} | {mib(temp)} | {mib(peak)} |")
    length = _MEMORY_SEQ_LEN.value
    print(f"\ncausal attention temp memory, T={length}, 4 heads x 64, float32:")
    print("| attention | forward MiB | grad MiB |")
    print("|---|---:|---:|")
    for implementation, forward, grad in attention_memory_table(length):
        print(f"| {implementation} | {mib(forward)} | {mib(grad)} |")


if __name__ == "__main__":
    cli.run(main)
