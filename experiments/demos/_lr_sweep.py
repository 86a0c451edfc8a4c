"""Learning-rate sweeps of the byte-level LM, one compiled program per model.

`sweep` trains `models.Transformer(config)` once per learning rate, all in one jitted
program (`vmap` over the peak lr, `lax.scan` over the steps), from the same init and on the
same batches: Adam with a warmup-cosine schedule of peak `lr`, followed by
`optim.scale_by_multipliers(models.mup_lr_multipliers(params, config))` (all ones under
"sp"), as the lr_transfer, stability and warmup demos need. The warmup length may differ
per run (the warmup demo trains with and without it in one program), and a `probe` can
measure the params and optimizer state at chosen steps inside the same program.
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


def sweep(config, lrs, batches, eval_batches=None, z_loss=0.0, warmup_fraction=0.1, seed=0,
          probe=None, probe_steps=(), probe_batch=None):
    """Trains `config`'s model at each peak learning rate of `lrs`; returns per-step curves.

    Args:
      config: a `models.TransformerConfig` (its parametrization picks the multipliers).
      lrs: peak learning rates.
      batches: int32 [steps, batch, seq_len + 1] tokens, one batch per step.
      eval_batches: int32 [n, batch, seq_len + 1] validation tokens, or None.
      z_loss: the z-loss coefficient of `models.lm_loss` (0 = none).
      warmup_fraction: linear warmup over this fraction of the steps, then cosine to 0.1x;
        one number for every run or one per entry of `lrs`.
      seed: the init seed (the same init for every lr).
      probe: optional `probe(loss_fn, params, opt_state, probe_batch) -> pytree of arrays`,
        evaluated on the params and Adam state before each step of `probe_steps` (so step 0
        is the init); `loss_fn(params, tokens)` is the training objective (z-loss included).
      probe_steps: the steps (in [0, steps)) at which `probe` runs.
      probe_batch: passed to `probe` (e.g. the tokens of a fixed batch).

    Returns:
      dict of float numpy arrays [len(lrs), steps]: "loss" (cross-entropy, z-loss excluded),
      "max_logit" (largest attention logit of the step's forward pass, over all layers);
      with `eval_batches`, "eval_loss" [len(lrs)]: the final params' mean cross-entropy
      on them; with `probe`, "probe": its outputs, each [len(lrs), len(probe_steps), ...].
    """
    model = models.Transformer(config)
    params = nn.unbox(jax.jit(model.init)(_common.prng_key(seed),
                                          batches[0, :, :-1]))["params"]
    steps = batches.shape[0]
    fractions = np.broadcast_to(np.asarray(warmup_fraction, np.float64), np.shape(lrs))
    # The schedule's shape, one row per run, evaluated here so that runs with different
    # warmups share one compiled program (adam reads its row at the step count).
    rows = {f: optim.schedules.warmup_cosine(1.0, steps, int(f * steps))(jnp.arange(steps))
            for f in set(fractions.tolist())}
    shapes = jnp.stack([rows[f] for f in fractions.tolist()])
    multipliers = optim.scale_by_multipliers(models.mup_lr_multipliers(params, config))
    probe_steps = sorted(set(int(t) for t in probe_steps))
    if probe_steps and not 0 <= probe_steps[0] <= probe_steps[-1] < steps:
        raise ValueError(f"probe_steps must lie in [0, {steps}), got {probe_steps}")
    is_probe = np.zeros(steps, bool)
    is_probe[probe_steps] = True

    def loss_fn(p, tokens):
        logits, state = model.apply({"params": p}, tokens[:, :-1], mutable=["attention_stats"])
        loss, metrics = models.lm_loss(logits, tokens[:, 1:], z_loss)
        return loss, (metrics["cross_entropy"], _max_logit(state["attention_stats"]))

    def objective(p, tokens):
        return loss_fn(p, tokens)[0]

    # Arrays enter the program as arguments, not as captured constants, so that the
    # persistent compilation cache (tests/conftest.py) serves a call with other data.
    def train(lr, shape, params, batches, eval_batches, probe_batch):
        tx = optax.chain(optim.adam(lambda count: shape[count]), multipliers)

        def measure(p, opt_state, now):
            if probe is None:
                return None
            # Only at probe steps: an unbatched predicate keeps the cond a cond under vmap.
            skip = jax.eval_shape(lambda: probe(objective, p, opt_state, probe_batch))
            return jax.lax.cond(now, lambda: probe(objective, p, opt_state, probe_batch),
                                lambda: jax.tree.map(jnp.zeros_like, skip))

        def step(carry, inputs):
            p, opt_state = carry
            tokens, now = inputs
            measured = measure(p, opt_state, now)
            grads, aux = jax.grad(loss_fn, has_aux=True)(p, tokens)
            updates, opt_state = tx.update(grads, opt_state, p)
            # adam(shape) steps by -shape(t) * direction; the peak lr scales it.
            return (jax.tree.map(lambda w, u: w + lr * u, p, updates), opt_state), (aux, measured)

        (p, _), (curves, measured) = jax.lax.scan(step, (params, tx.init(params)),
                                                  (batches, jnp.asarray(is_probe)))
        measured = jax.tree.map(lambda m: m[np.asarray(probe_steps, np.int32)], measured)
        if eval_batches is None:
            return curves, None, measured
        eval_loss = jax.lax.map(lambda tokens: loss_fn(p, tokens)[1][0], eval_batches).mean()
        return curves, eval_loss, measured

    (loss, max_logit), eval_loss, measured = jax.jit(jax.vmap(
        train, in_axes=(0, 0, None, None, None, None)))(
            jnp.asarray(lrs, jnp.float32), shapes, params, batches, eval_batches, probe_batch)
    result = {"loss": np.asarray(loss, np.float64), "max_logit": np.asarray(max_logit, np.float64)}
    if eval_batches is not None:
        result["eval_loss"] = np.asarray(eval_loss, np.float64)
    if probe is not None:
        result["probe"] = jax.tree.map(np.asarray, measured)
    return result
