"""The same tiny LM trained in fp32, bf16 and fp16 with dynamic loss scaling.

Mixed precision (Micikevicius et al., 2018, "Mixed Precision Training"): params stay in
float32 (master weights, updated by the optimizer in float32) while the matmuls run in a
16-bit compute dtype. bfloat16 has float32's exponent range, so it needs no loss scaling;
float16 has 5 exponent bits, so small gradients underflow unless the loss is multiplied by
a scale first. `optim.DynamicLossScale` halves the scale (and the step is skipped) when the
gradients overflow and doubles it after `period` clean steps.

Each run trains `models.Transformer` (byte-level, `models.TransformerConfig` with the given
policy) with `optim.adamw` and a warmup-cosine schedule on the same batches of the corpus,
using the shared train step of `experiments.train_lib` (loss scaling, skipping of
non-finite steps). Reported per precision: mean training loss over the last 10% of
steps, validation loss, skipped steps, the final loss scale, bytes of params + optimizer
state, and the temporary (activation) memory XLA allocates for one compiled train step.

  python -m ravine.experiments.demos.precision --steps=300
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine.experiments.runtime import cli, data, train_lib
from ravine.experiments.demos import _common

POLICIES = {
    "fp32": "params=float32,compute=float32,output=float32",
    "bf16": "params=float32,compute=bfloat16,output=float32",
    "fp16": "params=float32,compute=float16,output=float32",
}


def loss_scale_for(precision, period):
    """float16 needs loss scaling; float32 and bfloat16 have the range to go without."""
    if precision == "fp16":
        return optim.DynamicLossScale(scale=2.0**15, period=period)
    return optim.NoOpLossScale()


def tokens(corpus_split, seed, index, batch_size, seq_len):
    """Batch `index` as int32 [1, batch_size, seq_len + 1] (one micro-batch)."""
    return jnp.asarray(data.sample_batch(corpus_split, seed, index, batch_size, seq_len),
                       jnp.int32)


def train(precision, corpus, steps=300, batch_size=16, seq_len=64, d_model=64, n_layers=2,
          n_heads=4, learning_rate=3e-3, loss_scale_period=20, eval_batches=8, seed=0):
    """Trains one precision; returns its loss curve and summary numbers."""
    config = models.TransformerConfig(vocab_size=256, d_model=d_model, n_layers=n_layers,
                                      n_heads=n_heads, max_len=seq_len,
                                      policy=POLICIES[precision])
    model = models.Transformer(config)
    first = tokens(corpus.train, seed, 0, batch_size, seq_len)[0, :, :-1]
    params = nn.unbox(jax.jit(model.init)(_common.prng_key(seed), first))["params"]
    schedule = optim.schedules.warmup_cosine(learning_rate, steps, warmup_steps=steps // 10)
    tx = optim.adamw(schedule, weight_decay=0.1, mask=optim.decay_mask)
    loss_fn = train_lib.lm_loss(model)
    state = train_lib.init_state(params, tx, loss_scale_for(precision, loss_scale_period))
    train_step = jax.jit(train_lib.make_train_step(loss_fn, tx, schedule), donate_argnums=0)
    batch = tokens(corpus.train, seed, 0, batch_size, seq_len)
    compiled = train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))

    losses, scales = [], []
    for step in range(steps):
        state, metrics = compiled(state, tokens(corpus.train, seed, step, batch_size, seq_len))
        losses.append(float(metrics["loss"]))
        scales.append(float(metrics["loss_scale"]))
    eval_step = jax.jit(train_lib.make_eval_step(loss_fn))
    eval_loss = np.mean([float(eval_step(state.params, tokens(
        corpus.valid, seed, i, batch_size, seq_len))) for i in range(eval_batches)])
    tail = max(1, steps // 10)
    return {"losses": np.asarray(losses), "loss_scales": np.asarray(scales),
            "final_loss": float(np.mean(losses[-tail:])),
            "eval_loss": float(eval_loss), "skipped": int(state.skipped),
            "loss_scale": float(state.loss_scale.loss_scale),
            "state_bytes": int(state_bytes),
            "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes)}


def run(precisions=tuple(POLICIES), corpus_path="", **train_kwargs):
    """{precision: train(...)} on the same corpus and batches."""
    corpus = data.load_corpus(corpus_path)
    data.check_length(corpus, train_kwargs.get("seq_len", 64))
    return {p: train(p, corpus, **train_kwargs) for p in precisions}


def plot(result, outdir, dpi=100):
    fig, (ax, ax_scale) = _common.plt.subplots(1, 2, figsize=(10, 3.8))
    for precision, r in result.items():
        window = min(10, r["losses"].size)
        smooth = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
        ax.plot(np.arange(smooth.size) + window, smooth,
                label=f"{precision} (eval {r['eval_loss']:.3f}, skipped {r['skipped']})")
        if precision == "fp16":
            ax_scale.semilogy(r["loss_scales"], base=2)
    ax.set(xlabel="step", ylabel=f"training loss ({window}-step mean)",
           title="Tiny byte-level LM: fp32 vs bf16 vs fp16")
    ax_scale.set(xlabel="step", ylabel="loss scale",
                 title="fp16 dynamic loss scale (drops = skipped steps)")
    for a in (ax, ax_scale):
        a.grid(True, alpha=0.3)
    ax.legend()
    return _common.save_figure(fig, outdir, "precision", dpi)


def main(argv):
    del argv
    with cli.usage_errors():
        result = run(FLAGS.precisions, FLAGS.corpus, steps=FLAGS.steps,
                     batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, d_model=FLAGS.d_model,
                     n_layers=FLAGS.n_layers, learning_rate=FLAGS.learning_rate,
                     loss_scale_period=FLAGS.loss_scale_period, seed=FLAGS.seed)
    print(f"{FLAGS.steps} steps, batch {FLAGS.batch_size} x {FLAGS.seq_len} bytes")
    print(f"  {'precision':<10}{'train loss':>11}{'eval loss':>11}{'skipped':>9}"
          f"{'loss scale':>12}{'state MiB':>11}{'temp MiB':>10}")
    for precision, r in result.items():
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.2f}"
        print(f"  {precision:<10}{r['final_loss']:>11.4f}{r['eval_loss']:>11.4f}"
              f"{r['skipped']:>9d}{r['loss_scale']:>12g}{r['state_bytes'] / 2**20:>11.2f}"
              f"{temp:>10}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))


if __name__ == "__main__":
    flags.DEFINE_list("precisions", list(POLICIES), f"Runs, from {list(POLICIES)}.")
    flags.register_validator("precisions", lambda p: bool(p) and set(p) <= set(POLICIES),
                             message=f"--precisions must name runs from {list(POLICIES)}")
    flags.DEFINE_string("corpus", "", "Text file or folder; empty = the Python stdlib source.")
    flags.DEFINE_integer("steps", 300, "Training steps.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Sequences per batch.", lower_bound=1)
    flags.DEFINE_integer("seq_len", 64, "Bytes per sequence.", lower_bound=1)
    flags.DEFINE_integer("d_model", 64, "Model width.", lower_bound=4)
    flags.DEFINE_integer("n_layers", 2, "Transformer blocks.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate.", lower_bound=0.0)
    flags.DEFINE_integer("loss_scale_period", 20, "Clean steps before the fp16 scale doubles.",
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
