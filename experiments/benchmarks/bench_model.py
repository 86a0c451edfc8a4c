r"""Training throughput, model FLOPs utilisation (MFU) and hardware FLOPs utilisation (HFU).

For each width and precision it times a jitted train step (forward, backward, AdamW update;
state donated) and reports tokens/s and achieved FLOP/s = `models.flops_per_token` x tokens/s
(6N + attention, i.e. a training step counted as 3 forward passes; see models/accounting.py),
as a fraction of the machine's matmul peak measured in the same process: a jitted n x n x n
matmul in the same dtype, timed in rounds interleaved with the train step (best of each).
That fraction is MFU; HFU counts the FLOPs `--remat` recomputes as well
(`models.accounting.hardware_flops_per_token`; PaLM, Appendix B), so it equals MFU at
`--remat=none` and exceeds it by one forward pass of the blocks at `--remat=block` (any
`--remat_every`).

It also prints, from XLA's compiled memory analysis (no execution), the memory of a
value-and-grad step for each `remat` setting, and the temporary memory of causal attention
at T=2048 for "xla" against "chunked".

    python -m ravine.experiments.benchmarks.bench_model                          # CPU: d_model 256/512, fp32+bf16
    python -m ravine.experiments.benchmarks.bench_model --gpt2 --attention=cudnn # GPU: GPT-2 small (124M), bf16
    python -m ravine.experiments.benchmarks.bench_model --gpt2 --peak_tflops=989 # MFU against a datasheet peak
    python -m ravine.experiments.benchmarks.bench_model --remat=block --remat_every=2   # HFU > MFU
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

FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS):
    """The benchmark's flags, defined when it runs as a script (not on import: the tests
    import its functions in processes that also import other benchmarks, whose global flags
    share names with these)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_list("d_models", ["256", "512"], "Model widths to benchmark.", **fv)
    flags.DEFINE_list("precisions", ["fp32", "bf16"],
                      "Compute dtypes (fp32, bf16, fp16); params and logits stay fp32.", **fv)
    flags.DEFINE_integer("n_layers", 4, "Transformer blocks.", **fv)
    flags.DEFINE_integer("head_dim", 64, "Attention head width (n_heads = d / head_dim).", **fv)
    flags.DEFINE_integer("vocab_size", 256, "Vocabulary size.", **fv)
    flags.DEFINE_integer("seq_len", 256, "Training sequence length.", **fv)
    flags.DEFINE_integer("batch_size", 16, "Sequences per step.", **fv)
    flags.DEFINE_string("mlp", "swiglu", "swiglu or gelu.", **fv)
    flags.DEFINE_string("attention", "xla", "xla, cudnn or chunked.", **fv)
    flags.DEFINE_string("remat", "none", "none, block or dots (HFU counts what it recomputes).",
                        **fv)
    flags.DEFINE_integer("remat_every", 1, "With --remat=block, checkpoint segments of this "
                         "many blocks (TransformerConfig.remat_every).", **fv)
    flags.DEFINE_integer("steps", 10, "Train steps timed per round.", **fv)
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds of (train steps, matmuls); "
                         "the best of each is reported.", **fv)
    flags.DEFINE_integer("matmul_size", 0, "n of the n x n x n peak matmul; 0 picks "
                         "2048 on CPU and 8192 on accelerators.", **fv)
    flags.DEFINE_float("peak_tflops", 0.0, "If > 0, MFU and HFU are taken against this peak "
                       "(e.g. a datasheet number) instead of the measured matmul.", **fv)
    flags.DEFINE_bool("gpt2", False, "Benchmark a GPT-2-small-like 124M model in bf16 "
                      "(vocab 50304, d 768, 12 layers, 12 heads, T=1024) instead.", **fv)
    flags.DEFINE_bool("memory", True, "Print the compiled-memory tables (remat, attention).",
                      **fv)
    flags.DEFINE_integer("memory_seq_len", 2048, "T of the attention-memory table.", **fv)

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
                 "rounds", "memory_seq_len", "remat_every"):
        _positive(name, FLAGS[name].value)
    if FLAGS.matmul_size < 0:
        raise ValueError(f"--matmul_size must be >= 0, got {FLAGS.matmul_size}")
    if FLAGS.peak_tflops < 0:
        raise ValueError(f"--peak_tflops must be >= 0, got {FLAGS.peak_tflops}")
    for precision in FLAGS.precisions:
        if precision not in COMPUTE_DTYPES:
            raise ValueError(f"--precisions: unknown precision {precision!r}; "
                             f"known: {', '.join(COMPUTE_DTYPES)}")
    if FLAGS.attention == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"--attention=cudnn needs a GPU; this backend is "
                             f"{jax.default_backend()}")
        if "fp32" in FLAGS.precisions and not FLAGS.gpt2:
            raise ValueError("--attention=cudnn needs bf16 or fp16: drop fp32 from --precisions")
    common = dict(remat=FLAGS.remat, remat_every=FLAGS.remat_every, attention=FLAGS.attention)
    if FLAGS.gpt2:
        base = models.TransformerConfig(
            vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_len=1024, mlp="gelu",
            norm="layernorm", position="learned", tie_embeddings=True, **common)
        return [Setting(_with_precision(base, "bf16"), "bf16", FLAGS.batch_size, 1024)]
    settings = []
    for d_model in FLAGS.d_models:
        try:
            d_model = _positive("d_models", int(d_model))
        except ValueError:
            raise ValueError(f"--d_models: {d_model!r} is not a positive integer") from None
        if d_model % FLAGS.head_dim:
            raise ValueError(f"--head_dim {FLAGS.head_dim} does not divide d_model {d_model}")
        base = models.TransformerConfig(
            vocab_size=FLAGS.vocab_size, d_model=d_model, n_layers=FLAGS.n_layers,
            n_heads=d_model // FLAGS.head_dim, max_len=FLAGS.seq_len, mlp=FLAGS.mlp, **common)
        for precision in FLAGS.precisions:
            settings.append(Setting(_with_precision(base, precision), precision,
                                    FLAGS.batch_size, FLAGS.seq_len))
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


def benchmark(setting, matmul_size, steps=10, rounds=3):
    """(params, tokens/s, achieved FLOP/s, matmul FLOP/s) for one setting: `rounds` rounds
    of `steps` train steps interleaved with the peak matmul, the best of each."""
    config = setting.config
    init, step, _ = make_train_step(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(config.vocab_size,
                                      size=(setting.batch_size, setting.seq_len + 1)), jnp.int32)
    state = init(jax.random.key(0), tokens)
    n_params = models.count_params(state[0])

    def run_steps(state):
        for _ in range(steps):
            state, _ = step(state, tokens)
        return state

    dtype = jnp.dtype(COMPUTE_DTYPES[setting.precision])
    chain, matmul_args, matmul_flops = matmul_peak(dtype, matmul_size, reps=4)
    state, _ = step(state, tokens)  # compile
    jax.block_until_ready(chain(*matmul_args))
    best_steps = best_matmul = float("inf")
    for _ in range(rounds):
        state, seconds = timing.time_calls(run_steps, state, calls=1)
        best_steps = min(best_steps, seconds)
        best_matmul = min(best_matmul, timing.best_seconds(chain, *matmul_args, repeats=1,
                                                           warm_up=False))
    tokens_per_s = setting.batch_size * setting.seq_len * steps / best_steps
    achieved = models.flops_per_token(config, setting.seq_len) * tokens_per_s
    return n_params, tokens_per_s, achieved, matmul_flops / best_matmul


TABLE_HEADER = ("| d_model | layers | precision | params | tokens/s | TFLOP/s | matmul TFLOP/s "
                "| MFU | HFU |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|")


def throughput_row(setting, n_params, tokens_per_s, measured_peak, peak=None):
    """One row of the throughput table (a dict; `format_row` prints it).

    MFU = `models.flops_per_token` x tokens/s / peak (what the model needs); HFU =
    `models.accounting.hardware_flops_per_token` x tokens/s / peak (what the hardware runs:
    the recomputation of `setting.config.remat` counted too), so HFU / MFU = 1 at remat
    none. `peak` defaults to `measured_peak` (FLOP/s of the matmul timed beside the step).
    """
    config = setting.config
    peak = peak or measured_peak
    model = models.flops_per_token(config, setting.seq_len) * tokens_per_s
    hardware = models.accounting.hardware_flops_per_token(config, setting.seq_len) * tokens_per_s
    return {"d_model": config.d_model, "layers": config.n_layers,
            "precision": setting.precision, "params": n_params, "tokens_per_s": tokens_per_s,
            "flops": model, "matmul_flops": measured_peak, "mfu": model / peak,
            "hfu": hardware / peak}


def format_row(row):
    return (f"| {row['d_model']} | {row['layers']} | {row['precision']} | "
            f"{row['params'] / 1e6:.1f}M | {row['tokens_per_s']:,.0f} | "
            f"{row['flops'] / 1e12:.3f} | {row['matmul_flops'] / 1e12:.3f} | {row['mfu']:.1%} "
            f"| {row['hfu']:.1%} |")


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
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep jax's backend-probing INFO lines quiet
    with cli.usage_errors():
        settings = settings_from_flags()
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    matmul_size = FLAGS.matmul_size or (2048 if on_cpu else 8192)
    print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s); "
          f"jax {jax.__version__}")
    print(f"train step: batch x seq_len tokens, AdamW, attention={FLAGS.attention}, "
          f"remat={FLAGS.remat} (every {FLAGS.remat_every}); peak: {matmul_size}^3 matmul in "
          f"the compute dtype; HFU counts the recomputation\n")
    print(TABLE_HEADER)
    for setting in settings:
        n_params, tokens_per_s, _, measured_peak = benchmark(setting, matmul_size, FLAGS.steps,
                                                             FLAGS.rounds)
        print(format_row(throughput_row(setting, n_params, tokens_per_s, measured_peak,
                                        FLAGS.peak_tflops * 1e12)), flush=True)
    if FLAGS.peak_tflops:
        print(f"\nMFU and HFU against the given peak of {FLAGS.peak_tflops} TFLOP/s.")
    if not FLAGS.memory:
        return
    setting = settings[-1]
    print(f"\nremat, d_model {setting.config.d_model}, {setting.precision}, batch "
          f"{setting.batch_size} x {setting.seq_len} (compiled value_and_grad):")
    print("| remat | temp MiB | peak MiB (args + outputs + temp) |")
    print("|---|---:|---:|")
    for remat, temp, peak in remat_memory_table(setting):
        print(f"| {remat} | {mib(temp)} | {mib(peak)} |")
    length = FLAGS.memory_seq_len
    print(f"\ncausal attention temp memory, T={length}, 4 heads x 64, float32:")
    print("| attention | forward MiB | grad MiB |")
    print("|---|---:|---:|")
    for implementation, forward, grad in attention_memory_table(length):
        print(f"| {implementation} | {mib(forward)} | {mib(grad)} |")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
