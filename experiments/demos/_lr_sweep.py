"""Learning-rate sweeps of the byte-level LM, one compiled program per model.

`sweep` trains `models.Transformer(config)` once per learning rate, all in one jitted
program (`vmap` over the peak lr, `lax.scan` over the steps), from the same init and on the
same batches: Adam with a warmup-cosine schedule of peak `lr`, followed by
`optim.scale_by_multipliers(models.mup_lr_multipliers(params, config))` (all ones under
"sp"), as the lr_transfer and stability demos need.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine.experiments.runtime import data
from ravine.experiments.demos import _common


def make_batches(corpus_path, steps, batch_size, seq_len, eval_batches=0, seed=0):
    """`steps` training batches and `eval_batches` validation batches, int32
    [n, batch_size, seq_len + 1] each."""
    corpus = data.load_corpus(corpus_path)
    data.check_length(corpus, seq_len)

    def batches(split, n):
        return jnp.asarray(np.concatenate(
            [data.sample_batch(split, seed, i, batch_size, seq_len) for i in range(n)]
            or [np.zeros((0, batch_size, seq_len + 1), np.uint8)]), jnp.int32)

    return batches(corpus.train, steps), batches(corpus.valid, eval_batches)


def _max_logit(intermediates):
    return jnp.max(jnp.stack(jax.tree.leaves(intermediates)))


def sweep(config, lrs, batches, eval_batches=None, z_loss=0.0, warmup_fraction=0.1, seed=0):
    """Trains `config`'s model at each peak learning rate of `lrs`; returns per-step curves.

    Args:
      config: a `models.TransformerConfig` (its parametrization picks the multipliers).
      lrs: peak learning rates.
      batches: int32 [steps, batch, seq_len + 1] tokens, one batch per step.
      eval_batches: int32 [n, batch, seq_len + 1] validation tokens, or None.
      z_loss: the z-loss coefficient of `models.lm_loss` (0 = none).
      warmup_fraction: linear warmup over this fraction of the steps, then cosine to 0.1x.
      seed: the init seed (the same init for every lr).

    Returns:
      dict of float numpy arrays [len(lrs), steps]: "loss" (cross-entropy, z-loss excluded),
      "max_logit" (largest attention logit of the step's forward pass, over all layers);
      with `eval_batches`, "eval_loss" [len(lrs)]: the final params' mean cross-entropy
      on them.
    """
    model = models.Transformer(config)
    params = nn.unbox(jax.jit(model.init)(_common.prng_key(seed),
                                          batches[0, :, :-1]))["params"]
    steps = batches.shape[0]
    shape = optim.schedules.warmup_cosine(1.0, steps, warmup_steps=int(warmup_fraction * steps))
    tx = optax.chain(optim.adam(shape),
                     optim.scale_by_multipliers(models.mup_lr_multipliers(params, config)))

    def loss_fn(p, tokens):
        logits, state = model.apply({"params": p}, tokens[:, :-1], mutable=["attention_stats"])
        loss, metrics = models.lm_loss(logits, tokens[:, 1:], z_loss)
        return loss, (metrics["cross_entropy"], _max_logit(state["attention_stats"]))

    def train(lr):
        def step(carry, tokens):
            p, opt_state = carry
            grads, aux = jax.grad(loss_fn, has_aux=True)(p, tokens)
            updates, opt_state = tx.update(grads, opt_state, p)
            # adam(shape) steps by -shape(t) * direction; the peak lr scales it.
            return (jax.tree.map(lambda w, u: w + lr * u, p, updates), opt_state), aux

        (p, _), curves = jax.lax.scan(step, (params, tx.init(params)), batches)
        if eval_batches is None:
            return curves, None
        eval_loss = jax.lax.map(lambda tokens: loss_fn(p, tokens)[1][0], eval_batches).mean()
        return curves, eval_loss

    (loss, max_logit), eval_loss = jax.jit(jax.vmap(train))(jnp.asarray(lrs, jnp.float32))
    result = {"loss": np.asarray(loss, np.float64), "max_logit": np.asarray(max_logit, np.float64)}
    if eval_batches is not None:
        result["eval_loss"] = np.asarray(eval_loss, np.float64)
    return result

