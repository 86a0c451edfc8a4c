"""Where 16- and 8-bit training breaks, and the fixes: the mixed-precision paper's Sec. 3.

Five lessons, each measured (Micikevicius et al. 2018, "Mixed Precision Training",
https://arxiv.org/abs/1710.03740, the seed's source for the first three):

  1. fp16 without loss scaling fails. float16's smallest subnormal is 2^-24; an activation
     gradient below 2^-25 rounds to zero in the backward pass. The control run trains the
     tiny LM with float16 compute and no loss scaling; the demo counts the activation
     gradients (the cotangents at the outputs of every linear layer, taken with a flax
     method interceptor) that are zero in float16 but not in float32 at the same params
     and batch, and compares the loss it reaches with the dynamically loss-scaled run.
  2. The vanishing update. A float with p significant bits (float16 11, bfloat16 8) has
     spacing 2^(e - p + 1) in [2^e, 2^(e+1)). Round-to-nearest-even drops an update u
     with |u| <= spacing / 2 (ties to the even neighbour), so `w + u == w` becomes
     possible from |w| / |u| >= 2^p (2048 for float16, 256 for bfloat16; at w a power of
     two, u away from zero) and certain from 2^(p+1) (4096, 512). The closed form is
     checked on one parameter for every ratio and every significand, and on the tiny LM
     with bfloat16 params and no float32 master weights (optimizer state in float32, only
     the params' storage differs): the fraction of nonzero updates that leave the weight
     unchanged, and the loss gap to float32 master weights.
  3. fp32 -> bf16 conversion: round-to-nearest-even (what `astype` does) against truncation
     (dropping the low 16 bits): relative error at most 2^-8 and unbiased against at most
     2^-7 and biased towards zero by 2^-8 ln 2 on average (significands uniform in [1, 2)).
  4. Stochastic rounding of bfloat16 params (`optim.apply_updates_stochastic`) as the fix:
     unbiased in expectation, so updates below the spacing add up; the share of the
     master-weights gap it recovers on the tiny LM.
  5. float8 matmuls: `Policy(matmul="fp8")`, flax's `nn.Fp8DirectDotGeneralOp` in every
     attention and MLP projection: e4m3 inputs and kernels forward, e5m2 output gradients
     backward, one scale per tensor. flax scales with *delayed* scaling (the scale of a
     step comes from an amax history of earlier steps); the seed's torchao recipe
     ("tensorwise") scales *dynamically* from the current tensor's amax. The scales and
     histories live in the `_overwrite_with_gradient` collection (`models.FP8_COLLECTION`):
     `train_step` differentiates with respect to it and stores its "gradient" (the new
     scales) as is; the optimizer, its state, weight decay and gradient norms never see it
     (flax's `TrainState.apply_gradients` does the same). Final loss against bf16.

On XLA:CPU float16 / bfloat16 / float8 arithmetic is emulated (computed in float32 and
rounded), so the numbers are what the formats give, not what an accelerator's kernels
(accumulation order, fp8 GEMM accumulators) give; float8 is no faster here.

  python -m ravine.experiments.demos.precision_limits --steps=400
"""
import dataclasses
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine.experiments.demos import _common
from ravine.experiments.runtime import cli, data

FP8 = models.FP8_COLLECTION

# Each run of the tiny LM: a policy, how updates reach the params and the loss scaling.
# "master" adds the float32 update to float32 params (mixed precision's master weights);
# "nearest" / "truncate" / "stochastic" round the float32 sum p + u into bfloat16 params.
RUNS = {
    "fp32": dict(policy="p=f32,c=f32,o=f32", rounding="master", loss_scale="none"),
    "bf16": dict(policy="p=f32,c=bf16,o=f32", rounding="master", loss_scale="none"),
    "bf16_params": dict(policy="p=bf16,c=bf16,o=f32", rounding="nearest", loss_scale="none"),
    "bf16_params_trunc": dict(policy="p=bf16,c=bf16,o=f32", rounding="truncate",
                              loss_scale="none"),
    "bf16_params_sr": dict(policy="p=bf16,c=bf16,o=f32", rounding="stochastic",
                           loss_scale="none"),
    "fp16_no_scaling": dict(policy="p=f32,c=f16,o=f32", rounding="master", loss_scale="none"),
    "fp16_scaled": dict(policy="p=f32,c=f16,o=f32", rounding="master", loss_scale="dynamic"),
    "fp8": dict(policy="p=f32,c=bf16,o=f32,matmul=fp8", rounding="master", loss_scale="none"),
}
DEFAULT_RUNS = tuple(RUNS)


# --- the vanishing update on one parameter ------------------------------------------------


def significand_bits(dtype) -> int:
    """p: significant bits of a float format, the implicit one included (fp16 11, bf16 8)."""
    return int(jnp.finfo(dtype).nmant) + 1


def vanishing_ratios(dtype) -> tuple[int, int]:
    """(2^p, 2^(p+1)): from the first |w|/|u| an update can vanish, from the second it must."""
    p = significand_bits(dtype)
    return 2**p, 2 ** (p + 1)


def grid_in_one_binade(dtype) -> np.ndarray:
    """Every value of `dtype` in [1, 2) (as float64): 2^(p-1) significands."""
    n = 2 ** (significand_bits(dtype) - 1)
    return 1.0 + np.arange(n) / n


def predicted_vanishing(w, u, dtype) -> np.ndarray:
    """Closed form, float64 arithmetic only: does round-to-nearest-even give fl(w + u) == w?

    w must be a positive normal value of `dtype`. With spacing s above w and s' below
    (s' = s / 2 at a power of two): vanishes iff |u| < s/2 (u > 0) or |u| < s'/2 (u < 0),
    or |u| equals that half-spacing and w's last significand bit is even.
    """
    w, u = np.asarray(w, np.float64), np.asarray(u, np.float64)
    p = significand_bits(dtype)
    exponent = np.floor(np.log2(w))
    above = 2.0 ** (exponent - p + 1)
    below = np.where(w == 2.0**exponent, above / 2, above)
    half = np.where(u > 0, above, below) / 2
    last_bit_even = np.round(w / above) % 2 == 0
    return (np.abs(u) < half) | ((np.abs(u) == half) & last_bit_even)


def measured_vanishing(w, u, dtype) -> np.ndarray:
    """What the arithmetic does: `w + u == w` with w and u both in `dtype` (XLA adds them
    exactly in float32 and rounds once to `dtype`)."""
    w_low = jnp.asarray(w, dtype)
    return np.asarray(w_low + jnp.asarray(u, dtype) == w_low)


def vanishing_sweep(dtype, ratios) -> dict:
    """For each ratio r and sign: the fraction of all w in [1, 2) of `dtype` with
    w + u == w for u = +-w / r (u rounded to `dtype`, so the sum is exact before the one
    rounding that matters), measured and by the closed form, and the continuous-limit
    curve clip(r / 2^p - 1, 0, 1) (u away from zero)."""
    w = grid_in_one_binade(dtype)
    ratios = np.asarray(ratios, np.float64)
    out = {"ratios": ratios.tolist()}
    for sign, name in ((1.0, "up"), (-1.0, "down")):
        u = np.asarray(jnp.asarray(sign * w[None, :] / ratios[:, None], dtype), np.float64)
        ww = np.broadcast_to(w[None, :], u.shape)
        measured = measured_vanishing(ww, u, dtype)
        predicted = predicted_vanishing(ww, u, dtype)
        out[f"measured_{name}"] = measured.mean(axis=1).tolist()
        out[f"predicted_{name}"] = predicted.mean(axis=1).tolist()
        out[f"mismatches_{name}"] = int((measured != predicted).sum())
    first, certain = vanishing_ratios(dtype)
    out["limit_up"] = np.clip(ratios / first - 1, 0, 1).tolist()
    # The smallest swept ratio at which any update vanishes / every update vanishes.
    any_ = np.flatnonzero(np.maximum(out["measured_up"], out["measured_down"]))
    all_ = np.flatnonzero(np.minimum(out["measured_up"], out["measured_down"]) == 1)
    out["first_ratio_any"] = float(ratios[any_[0]]) if any_.size else None
    out["first_ratio_all"] = float(ratios[all_[0]]) if all_.size else None
    out["threshold"], out["certain"] = first, certain
    return out


def accumulate_small_updates(steps=1000, ratio=1000.0, copies=1024, seed=0) -> dict:
    """One weight w0 = 1 updated `steps` times by +w0/ratio, in float32, and in bfloat16 by
    round-to-nearest, truncation and stochastic rounding (`copies` independent draws).

    Returns the trajectories (`trajectory`: name -> array [steps + 1]; stochastic rounding
    as the mean over copies, with `stochastic_std`) and the final values."""
    u = jnp.float32(1.0 / ratio)
    keys = jax.random.split(_common.prng_key(seed), steps)

    def step(carry, key):
        w32, nearest, trunc, sr = carry
        carry = (w32 + u, (nearest.astype(jnp.float32) + u).astype(jnp.bfloat16),
                 truncate_to_bfloat16(trunc.astype(jnp.float32) + u),
                 optim.stochastic_round(sr.astype(jnp.float32) + u, jnp.bfloat16, key))
        return carry, _summary(carry)

    def _summary(carry):
        w32, nearest, trunc, sr = carry
        sr = sr.astype(jnp.float32)
        return (w32, nearest.astype(jnp.float32), trunc.astype(jnp.float32), sr.mean(),
                sr.std())

    one = jnp.ones((), jnp.bfloat16)
    init = (jnp.float32(1.0), one, one, jnp.ones((copies,), jnp.bfloat16))
    _, history = jax.jit(lambda c: jax.lax.scan(step, c, keys))(init)
    start = _summary(init)
    w32, nearest, trunc, sr_mean, sr_std = (
        np.concatenate([[float(a)], np.asarray(h, np.float64)]) for a, h in zip(start, history))
    return {"steps": steps, "ratio": ratio, "copies": copies, "exact": 1.0 + steps / ratio,
            "fp32": float(w32[-1]), "bf16_nearest": float(nearest[-1]),
            "bf16_truncate": float(trunc[-1]), "bf16_stochastic_mean": float(sr_mean[-1]),
            "bf16_stochastic_std": float(sr_std[-1]),
            "trajectory": {"fp32": w32, "bf16 nearest": nearest, "bf16 truncate": trunc,
                           "bf16 stochastic (mean)": sr_mean},
            "stochastic_std": sr_std}


# --- fp32 -> bf16: round to nearest even vs truncation -------------------------------------


def truncate_to_bfloat16(x: jax.Array) -> jax.Array:
    """float32 -> bfloat16 by dropping the low 16 bits (round toward zero)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    kept = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
    return kept.astype(jnp.bfloat16)  # exact: the low half is zero


def nearest_even_to_bfloat16(x: jax.Array) -> jax.Array:
    """float32 -> bfloat16 round-to-nearest-even by integer arithmetic (finite x): add
    0x7FFF plus the last kept bit, then drop the low 16 bits; equals `x.astype(bfloat16)`."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    bits = bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    kept = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
    return kept.astype(jnp.bfloat16)


def conversion_errors(n=1_000_000, seed=0) -> dict:
    """Relative errors of fp32 -> bf16 by RNE and by truncation on n float32 numbers with
    significands uniform in [1, 2), random exponents in [-20, 20] and random signs, against
    the closed forms: RNE max 2^-8, mean 0, mean |.| 2^-9 ln 2; truncation max 2^-7, mean
    -2^-8 ln 2 (towards zero: relative to |x|), mean |.| 2^-8 ln 2."""
    @jax.jit
    def sample_and_round(key):
        k1, k2, k3 = jax.random.split(key, 3)
        significand = jax.random.uniform(k1, (n,), jnp.float32, 1.0, 2.0)
        exponent = jax.random.randint(k2, (n,), -20, 21).astype(jnp.float32)
        sign = jnp.where(jax.random.bernoulli(k3, 0.5, (n,)), 1.0, -1.0)
        x = sign * significand * jnp.exp2(exponent)
        nearest = x.astype(jnp.bfloat16)
        return x, nearest, truncate_to_bfloat16(x), jnp.all(nearest_even_to_bfloat16(x) == nearest)

    x, nearest, truncated, matches = jax.device_get(sample_and_round(_common.prng_key(seed)))
    x64 = np.asarray(x, np.float64)
    out = {"n": n, "rne_matches_astype": bool(matches)}
    for name, rounded in (("rne", nearest), ("truncate", truncated)):
        # signed relative error towards |x|: negative = magnitude shrank
        rel = (np.abs(np.asarray(rounded, np.float64)) - np.abs(x64)) / np.abs(x64)
        out[name] = {"max_abs": float(np.abs(rel).max()), "mean": float(rel.mean()),
                     "mean_abs": float(np.abs(rel).mean())}
    ln2 = math.log(2.0)
    out["closed_form"] = {"rne": {"max_abs": 2.0**-8, "mean": 0.0, "mean_abs": 2.0**-9 * ln2},
                          "truncate": {"max_abs": 2.0**-7, "mean": -(2.0**-8) * ln2,
                                       "mean_abs": 2.0**-8 * ln2}}
    return out


# --- the tiny LM ---------------------------------------------------------------------------


class RunState(NamedTuple):
    """State of one tiny-LM run.

    Attributes:
      step: int32 scalar.
      params: the model params, in the policy's param dtype.
      fp8: `{FP8_COLLECTION: ...}` (fp8 scales and amax histories) or `{}`.
      opt_state: the optimizer state (float32, built on a float32 copy of the params).
      loss_scale: an `optim` loss scale.
      key: PRNG key for stochastic rounding.
    """
    step: Any
    params: Any
    fp8: Any
    opt_state: Any
    loss_scale: Any
    key: Any


def lm_loss(model, variables, tokens):
    """Next-token cross-entropy (float32) of `model` on tokens [B, T + 1]."""
    logits = model.apply(variables, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()


def _to_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def apply_updates(params, updates, rounding, key):
    """New params: float32 sum p + u, then into the params' dtype by `rounding`."""
    if rounding in ("master", "nearest"):
        return optax.apply_updates(params, updates)  # round to nearest even (exact for f32)
    if rounding == "stochastic":
        return optim.apply_updates_stochastic(params, updates, key)
    if rounding == "truncate":
        return jax.tree.map(
            lambda p, u: truncate_to_bfloat16(p.astype(jnp.float32) + u).astype(p.dtype),
            params, updates)
    raise ValueError(f"rounding must be master, nearest, stochastic or truncate, got {rounding!r}")


def make_train_step(model, tx, rounding):
    """`step(state, tokens) -> (state, metrics)` for one run.

    The gradient is taken with respect to all variables, params and (with float8 matmuls)
    the `FP8_COLLECTION`, whose cotangent flax's fp8 ops define as the *new* scales and
    amax histories. That collection is split off before the optimizer: `tx` sees only the
    params (so no optimizer state, weight decay or gradient norm involves it), and the new
    fp8 state replaces the old one as is. Gradients are unscaled (loss scaling), cast to
    float32 and the step is skipped when they are not finite.

    Metrics: loss, finite, loss_scale, vanished (fraction of param entries with a nonzero
    update whose stored value did not change) and ratio_ge_256 (fraction with
    |w| >= 256 |u|, u != 0).
    """
    def train_step(state: RunState, tokens):
        def scaled_loss(variables):
            loss = lm_loss(model, variables, tokens)
            return state.loss_scale.scale(loss), loss

        variables = {"params": state.params, **state.fp8}
        grads, loss = jax.grad(scaled_loss, has_aux=True)(variables)
        new_fp8 = {FP8: grads[FP8]} if FP8 in grads else {}  # overwritten, not optimized
        grads = _to_float32(state.loss_scale.unscale(grads["params"]))
        finite = optim.all_finite(grads)
        params32 = _to_float32(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, params32)
        params = apply_updates(state.params, updates, rounding,
                               jax.random.fold_in(state.key, state.step))
        leaves = lambda tree: jax.tree.leaves(tree)  # noqa: E731
        size = sum(x.size for x in leaves(grads))
        moved = [(u != 0) for u in leaves(updates)]
        metrics = {
            "loss": loss, "finite": finite, "loss_scale": state.loss_scale.loss_scale,
            "vanished": sum(jnp.sum(m & (new == old)) for m, new, old in zip(
                moved, leaves(params), leaves(state.params))) / size,
            "ratio_ge_256": sum(jnp.sum(m & (jnp.abs(w) >= 256 * jnp.abs(u))) for m, w, u in zip(
                moved, leaves(params32), leaves(updates))) / size,
        }
        new = {"params": params, "opt_state": opt_state, "fp8": new_fp8}
        old = {"params": state.params, "opt_state": state.opt_state, "fp8": state.fp8}
        new = optim.select_tree(finite, new, old)  # a skipped step changes no variables
        state = state._replace(step=state.step + 1, loss_scale=state.loss_scale.adjust(finite),
                               **new)
        return state, metrics

    return train_step


def linear_output_cotangents(model, variables, tokens, scales=(1.0,)):
    """Gradients of `scale * loss` with respect to the output of every `models.layers.Dense`
    (the activation gradients of the backward pass, in the compute dtype), one dict
    {module path: array} per entry of `scales` (one compilation for all). A zero
    perturbation is added to each output by a flax method interceptor; the model is
    unchanged."""
    def is_dense_call(context):
        return (isinstance(context.module, models.layers.Dense)
                and context.method_name == "__call__")

    shapes = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if is_dense_call(context):
            shapes["/".join(context.module.path)] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: lm_loss(model, v, tokens), variables)

    def scaled_loss(perturbations, scale):
        def add(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            return out + perturbations["/".join(context.module.path)] if is_dense_call(
                context) else out

        with nn.intercept_methods(add):
            return lm_loss(model, variables, tokens) * scale

    grad = jax.jit(jax.grad(scaled_loss))
    zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}
    return [grad(zeros, jnp.float32(scale)) for scale in scales]


HISTOGRAM_BINS = np.arange(-44, 1)  # log2 |activation gradient|


def underflow_census(make_model, params, tokens, scale=2.0**15) -> dict:
    """At the same float32 params and batch, the activation gradients (see
    `linear_output_cotangents`) of float16 compute without loss scaling that are zero
    where float32 compute's are not (flushed); the share of float32's that lie below 2^-24
    (float16's smallest subnormal) and below 2^-25 (what round-to-nearest flushes); and
    the flushed share with the loss scaled by `scale`. Fractions of all entries, and the
    histogram of log2 |float32 gradient| over HISTOGRAM_BINS.

    `make_model(policy_spec)` returns the model under a policy (params float32)."""
    def cotangents(policy, scales):
        outs = linear_output_cotangents(make_model(policy), {"params": params}, tokens, scales)
        return [np.concatenate([np.asarray(x, np.float64).ravel() / s for x in out.values()])
                for s, out in zip(scales, outs)]

    g32, = cotangents("p=f32,c=f32,o=f32", (1.0,))
    g16, g16_scaled = cotangents("p=f32,c=f16,o=f32", (1.0, scale))
    nonzero = g32 != 0
    counts, _ = np.histogram(np.log2(np.abs(g32[nonzero])), HISTOGRAM_BINS)
    return {"entries": int(g32.size), "scale": scale,
            "fp32_zero": float(np.mean(~nonzero)),
            "fp32_below_2^-24": float(np.mean(nonzero & (np.abs(g32) < 2.0**-24))),
            "fp32_below_2^-25": float(np.mean(nonzero & (np.abs(g32) < 2.0**-25))),
            "fp16_flushed": float(np.mean(nonzero & (g16 == 0))),
            "fp16_scaled_flushed": float(np.mean(nonzero & (g16_scaled == 0))),
            "fp32_median_abs": float(np.median(np.abs(g32[nonzero]))),
            "log2_histogram": (counts / g32.size).tolist()}


# --- runs ----------------------------------------------------------------------------------


def batch(split, seed, index, batch_size, seq_len):
    """Batch `index` of a corpus split as int32 [batch_size, seq_len + 1]."""
    return jnp.asarray(data.sample_batch(split, seed, index, batch_size, seq_len)[0], jnp.int32)


def model_config(name, seq_len=64, d_model=64, n_layers=2, n_heads=4):
    """The tiny LM's `TransformerConfig` for run `name` (its policy from RUNS)."""
    return models.TransformerConfig(vocab_size=256, d_model=d_model, n_layers=n_layers,
                                    n_heads=n_heads, max_len=seq_len,
                                    policy=RUNS[name]["policy"])


def init_params(config, tokens, seed):
    """float32 params of `config`'s model (every run starts from these, cast to its
    param dtype) and its float8 collection (`{}` without float8 matmuls)."""
    policy = dataclasses.replace(models.get_policy(config.policy), param_dtype=np.float32)
    model = models.Transformer(dataclasses.replace(config, policy=str(policy)))
    variables = nn.unbox(jax.jit(model.init)(_common.prng_key(seed), tokens[:, :-1]))
    fp8 = {FP8: variables[FP8]} if FP8 in variables else {}
    return variables["params"], fp8


def train(name, corpus, steps=400, batch_size=16, seq_len=64, d_model=64, n_layers=2,
          n_heads=4, learning_rate=3e-3, loss_scale_period=100, eval_batches=32, seed=0):
    """Trains run `name` of RUNS with AdamW (weight decay 0.1 on matrices, warmup-cosine
    schedule) on the same batches as every other run; returns its curves, summary numbers
    and final state."""
    spec = RUNS[name]
    config = model_config(name, seq_len, d_model, n_layers, n_heads)
    model = models.Transformer(config)
    policy = models.get_policy(config.policy)
    params32, fp8 = init_params(config, batch(corpus.train, seed, 0, batch_size, seq_len), seed)
    initial_fp8 = jax.device_get(fp8)  # the step donates the state's buffers
    schedule = optim.schedules.warmup_cosine(learning_rate, steps, warmup_steps=steps // 10)
    tx = optim.adamw(schedule, weight_decay=0.1, mask=optim.decay_mask)
    loss_scale = (optim.DynamicLossScale(2.0**15, period=loss_scale_period)
                  if spec["loss_scale"] == "dynamic" else optim.NoOpLossScale())
    state = RunState(step=jnp.zeros((), jnp.int32), params=policy.cast_to_param(params32),
                     fp8=fp8, opt_state=tx.init(params32), loss_scale=loss_scale,
                     key=_common.prng_key(seed + 1))
    train_step = jax.jit(make_train_step(model, tx, spec["rounding"]), donate_argnums=0)
    history = []
    start = time.perf_counter()
    for index in range(steps):
        if index == 1:
            jax.block_until_ready(state)
            start = time.perf_counter()  # step time without the compilation
        state, metrics = train_step(state, batch(corpus.train, seed, index, batch_size, seq_len))
        history.append(metrics)
    jax.block_until_ready(state)
    step_seconds = (time.perf_counter() - start) / max(1, steps - 1)
    history = {key: np.asarray([m[key] for m in jax.device_get(history)], np.float64)
               for key in history[0]}
    eval_loss = jax.jit(lambda s, t: lm_loss(model, {"params": s.params, **s.fp8}, t))
    evals = [float(eval_loss(state, batch(corpus.valid, seed, i, batch_size, seq_len)))
             for i in range(eval_batches)]
    tail, half = max(1, steps // 10), steps // 2
    out = {"policy": str(policy), "rounding": spec["rounding"],
           "loss_scaling": spec["loss_scale"], "curves": history,
           "final_loss": float(history["loss"][-tail:].mean()),
           "eval_loss": float(np.mean(evals)),
           "skipped": int(steps - history["finite"].sum()),
           "final_loss_scale": float(history["loss_scale"][-1]),
           "vanished_second_half": float(history["vanished"][half:].mean()),
           "ratio_ge_256_second_half": float(history["ratio_ge_256"][half:].mean()),
           "step_seconds": step_seconds, "state": state}
    if fp8:
        out["fp8"] = fp8_summary(initial_fp8, state)
    return out


def fp8_summary(initial, state) -> dict:
    """What happened to the float8 collection: how many of its variables the steps changed
    (overwrote), the optimizer's leaf count against the params' (AdamW: 2 per param + a
    count, none for the collection) and one layer's final input / kernel / output-gradient
    scales."""
    initial_leaves = jax.tree.leaves(initial)
    final = state.fp8[FP8]
    changed = sum(bool(jnp.any(a != b)) for a, b in zip(initial_leaves, jax.tree.leaves(
        state.fp8)))
    n_params = len(jax.tree.leaves(state.params))
    n_fp8 = len(initial_leaves)
    paths = sorted(jax.tree_util.tree_flatten_with_path(final)[0],
                   key=lambda kv: jax.tree_util.keystr(kv[0]))
    first = jax.tree_util.keystr(paths[0][0]).rsplit("[", 1)[0]  # one layer's op
    scales = {jax.tree_util.keystr(path).rsplit("[", 1)[1].strip("[]'"): float(value[0])
              for path, value in paths if jax.tree_util.keystr(path).startswith(first)
              and jax.tree_util.keystr(path).endswith("_scale']")}
    return {"variables": n_fp8, "changed": changed,
            "opt_state_leaves": len(jax.tree.leaves(state.opt_state)), "param_leaves": n_params,
            "layer": first, "scales": scales}


def run(runs=DEFAULT_RUNS, corpus_path="", ratios=None, census=True, **train_kwargs):
    """The one-parameter sweeps, the conversion errors and the tiny-LM runs; returns one
    dict of everything the demo prints, plots and writes."""
    # 2^(k/16): exact powers of two among them, so the thresholds are hit exactly
    ratios = np.exp2(np.linspace(6, 14, 129)) if ratios is None else np.asarray(ratios)
    result = {"sweep": {"float16": vanishing_sweep(jnp.float16, ratios),
                        "bfloat16": vanishing_sweep(jnp.bfloat16, ratios)},
              "accumulate": accumulate_small_updates(),
              "conversion": conversion_errors()}
    corpus = data.load_corpus(corpus_path)
    seq_len = train_kwargs.get("seq_len", 64)
    data.check_length(corpus, seq_len)
    result["runs"] = {name: train(name, corpus, **train_kwargs) for name in runs}
    result["comparisons"] = compare(result["runs"])
    if census:
        sizes = {k: train_kwargs[k] for k in ("seq_len", "d_model", "n_layers", "n_heads")
                 if k in train_kwargs}
        config = model_config("fp32", **sizes)
        seed, batch_size = train_kwargs.get("seed", 0), train_kwargs.get("batch_size", 16)
        tokens = batch(corpus.valid, seed, 0, batch_size, seq_len)
        params, _ = init_params(config, tokens, seed)
        def make_model(policy):
            return models.Transformer(dataclasses.replace(config, policy=policy))

        result["census"] = {"init": underflow_census(make_model, params, tokens)}
        if "fp16_no_scaling" in result["runs"]:
            trained = result["runs"]["fp16_no_scaling"]["state"].params
            result["census"]["after_fp16_no_scaling"] = underflow_census(make_model, trained,
                                                                         tokens)
    return result


def compare(runs) -> dict:
    """The headline differences between runs (those present): fp8 against bf16 (relative),
    fp16 without against with loss scaling, bf16 params against float32 master weights
    and the share of that gap stochastic rounding recovers; on the final training loss
    and (`_eval`) on the validation loss."""
    def loss(name):
        return runs[name]["final_loss"] if name in runs else None

    out = {}
    if loss("fp8") is not None and loss("bf16") is not None:
        out["fp8_over_bf16"] = loss("fp8") / loss("bf16") - 1
        out["fp8_over_bf16_eval"] = runs["fp8"]["eval_loss"] / runs["bf16"]["eval_loss"] - 1
    if loss("fp16_no_scaling") is not None and loss("fp16_scaled") is not None:
        out["fp16_no_scaling_minus_scaled"] = loss("fp16_no_scaling") - loss("fp16_scaled")
    for kind, key in (("", "final_loss"), ("_eval", "eval_loss")):
        if not all(n in runs for n in ("bf16", "bf16_params")):
            break
        gap = runs["bf16_params"][key] - runs["bf16"][key]
        out[f"bf16_params_gap{kind}"] = gap
        if "bf16_params_sr" in runs:
            out[f"bf16_params_sr_gap{kind}"] = runs["bf16_params_sr"][key] - runs["bf16"][key]
            out[f"sr_recovered_fraction{kind}"] = (
                runs["bf16_params"][key] - runs["bf16_params_sr"][key]) / gap
    return out


# --- report --------------------------------------------------------------------------------


def plot(result, outdir, dpi=100):
    fig, axes = _common.plt.subplots(2, 3, figsize=(17, 9))
    ax = axes[0, 0]
    for (dtype, sweep), color in zip(result["sweep"].items(), ("C0", "C1")):
        r = sweep["ratios"]
        ax.semilogx(r, sweep["measured_up"], "-", color=color, label=f"{dtype}: u > 0")
        ax.semilogx(r, sweep["measured_down"], "--", color=color, label=f"{dtype}: u < 0")
        ax.semilogx(r, sweep["limit_up"], ":", color="k", lw=0.8)
        ax.axvline(sweep["threshold"], color=color, lw=0.8)
    ax.set(xlabel="|w| / |u|", ylabel="fraction of w in [1, 2) with w + u == w",
           title="Vanishing update (dotted: clip(r/2^p - 1, 0, 1))")
    ax = axes[0, 1]
    acc = result["accumulate"]
    for label, values in acc["trajectory"].items():
        ax.plot(values, label=label)
    mean, std = acc["trajectory"]["bf16 stochastic (mean)"], acc["stochastic_std"]
    ax.fill_between(np.arange(mean.size), mean - std, mean + std, color="C3", alpha=0.2)
    ax.set(xlabel="step", ylabel="w", title=f"w0 = 1, {acc['steps']} updates of w0/"
           f"{acc['ratio']:g} (band: SR +- 1 sd)")
    ax = axes[0, 2]
    conv = result["conversion"]
    names = ("max_abs", "mean", "mean_abs")
    x = np.arange(len(names))
    for k, (mode, color) in enumerate((("rne", "C0"), ("truncate", "C1"))):
        ax.bar(x + (k - 0.5) * 0.35, [conv[mode][n] / 2**-8 for n in names], 0.35,
               color=color, label=f"{mode} (measured)")
        ax.plot(x + (k - 0.5) * 0.35, [conv["closed_form"][mode][n] / 2**-8 for n in names],
                "k_", ms=20)
    ax.set_xticks(x, ["max |rel err|", "mean rel err", "mean |rel err|"])
    ax.set(ylabel="units of 2^-8", title="fp32 -> bf16 (black: closed form)")
    ax = axes[1, 0]
    runs = result["runs"]
    reference = "bf16" if "bf16" in runs else next(iter(runs))
    window = min(20, runs[reference]["curves"]["loss"].size)

    def smooth(values):
        return np.convolve(values, np.ones(window) / window, mode="valid")

    base = smooth(runs[reference]["curves"]["loss"])
    for name, r in runs.items():
        ax.plot(np.arange(base.size) + window, smooth(r["curves"]["loss"]) - base,
                label=f"{name} (final {r['final_loss']:.3f}, eval {r['eval_loss']:.3f})")
    ax.set(xlabel="step", ylabel=f"training loss - {reference}'s ({window}-step means)",
           title="Tiny LM, same batches (negative = better)")
    ax = axes[1, 1]
    for name, r in result["runs"].items():
        if r["rounding"] != "master":
            note = " (moves in expectation)" if r["rounding"] == "stochastic" else ""
            ax.plot(r["curves"]["vanished"], label=f"{name}: w + u == w{note}")
    for name in ("bf16", "fp32"):
        if name in result["runs"]:
            ax.plot(result["runs"][name]["curves"]["ratio_ge_256"], "k:",
                    label=f"{name}: |w| >= 256 |u|")
            break
    ax.set(xlabel="step", ylabel="fraction of params", title="Updates lost to rounding")
    ax = axes[1, 2]
    centres = (HISTOGRAM_BINS[:-1] + HISTOGRAM_BINS[1:]) / 2
    for where, cen in result.get("census", {}).items():
        ax.plot(centres, cen["log2_histogram"], drawstyle="steps-mid",
                label=f"fp32, {where}: {cen['fp16_flushed']:.1%} flushed in fp16")
    ax.axvline(-24, color="r", lw=1, label="2^-24 (fp16 smallest subnormal)")
    ax.axvline(-14, color="r", ls=":", lw=1, label="2^-14 (fp16 smallest normal)")
    ax.axvline(-24 - 15, color="g", ls="--", lw=1, label="2^-24 / 2^15 (with loss scale 2^15)")
    ax.set(xlabel="log2 |activation gradient|", ylabel="fraction of entries",
           title="Activation gradients (outputs of the linear layers)")
    for a in axes.flat:
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    return _common.save_figure(fig, outdir, "precision_limits", dpi)


def record(result) -> dict:
    """The JSON-able numbers (curves, trajectories and states dropped)."""
    sweeps = {dtype: {k: v for k, v in s.items() if not isinstance(v, list)}
              for dtype, s in result["sweep"].items()}
    accumulate = {k: v for k, v in result["accumulate"].items()
                  if k not in ("trajectory", "stochastic_std")}
    runs = {name: {k: v for k, v in r.items() if k not in ("curves", "state")}
            for name, r in result["runs"].items()}
    out = {"sweep": sweeps, "accumulate": accumulate, "conversion": result["conversion"],
           "runs": runs, "comparisons": result["comparisons"]}
    if "census" in result:
        out["census"] = result["census"]
    return out


def write_results(result, outdir):
    return _common.write_results("precision_limits", record(result), outdir)


def main(argv):
    del argv
    with cli.usage_errors():
        result = run(FLAGS.runs, FLAGS.corpus, census=FLAGS.census, steps=FLAGS.steps,
                     batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                     d_model=FLAGS.d_model, n_layers=FLAGS.n_layers,
                     learning_rate=FLAGS.learning_rate,
                     loss_scale_period=FLAGS.loss_scale_period,
                     eval_batches=FLAGS.eval_batches, seed=FLAGS.seed)
    print("1. the vanishing update on one parameter (every w in [1, 2), u = w / r)")
    for dtype, s in result["sweep"].items():
        print(f"  {dtype}: some w + u == w from r = {s['first_ratio_any']:g} (2^p = "
              f"{s['threshold']}), all from r = {s['first_ratio_all']:g} (2^(p+1) = "
              f"{s['certain']}); closed form vs hardware mismatches: "
              f"{s['mismatches_up'] + s['mismatches_down']}")
    a = result["accumulate"]
    print(f"  w0 = 1 plus {a['steps']} x w0/{a['ratio']:g}: exact {a['exact']:g}, fp32 "
          f"{a['fp32']:.4f}, bf16 nearest {a['bf16_nearest']:g}, bf16 truncate "
          f"{a['bf16_truncate']:g}, bf16 stochastic {a['bf16_stochastic_mean']:.4f} +- "
          f"{a['bf16_stochastic_std']:.4f} (sd over {a['copies']} draws)")
    c = result["conversion"]
    print(f"2. fp32 -> bf16 relative error over {c['n']:,} numbers (closed form in brackets); "
          f"integer RNE == astype: {c['rne_matches_astype']}")
    for mode in ("rne", "truncate"):
        m, f = c[mode], c["closed_form"][mode]
        print(f"  {mode:<9} max |err| {m['max_abs']:.3e} [{f['max_abs']:.3e}]  mean "
              f"{m['mean']:+.3e} [{f['mean']:+.3e}]  mean |err| {m['mean_abs']:.3e} "
              f"[{f['mean_abs']:.3e}]")
    print(f"3. tiny LM, {FLAGS.steps} steps, batch {FLAGS.batch_size} x {FLAGS.seq_len} bytes")
    print(f"  {'run':<18}{'train loss':>11}{'eval loss':>11}{'skipped':>9}"
          f"{'w+u==w':>9}{'|w|>=256|u|':>13}{'s/step':>8}")
    for name, r in result["runs"].items():
        print(f"  {name:<18}{r['final_loss']:>11.4f}{r['eval_loss']:>11.4f}{r['skipped']:>9d}"
              f"{r['vanished_second_half']:>9.3f}{r['ratio_ge_256_second_half']:>13.3f}"
              f"{r['step_seconds']:>8.3f}")
    for key, value in result["comparisons"].items():
        print(f"  {key}: {value:+.4f}")
    if "fp8" in result["runs"]:
        f = result["runs"]["fp8"]["fp8"]
        print(f"  fp8 collection: {f['changed']} of {f['variables']} variables changed by the "
              f"step; optimizer state has {f['opt_state_leaves']} leaves for "
              f"{f['param_leaves']} params (none for the fp8 collection)")
    for where, cen in result.get("census", {}).items():
        print(f"  activation gradients at {where} ({cen['entries']:,} entries): fp32 below "
              f"2^-24 {cen['fp32_below_2^-24']:.2%}, below 2^-25 {cen['fp32_below_2^-25']:.2%};"
              f" flushed to 0 in fp16 {cen['fp16_flushed']:.2%}, with loss scale "
              f"{cen['scale']:g} {cen['fp16_scaled_flushed']:.2%}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))
    print("saved", write_results(result, FLAGS.outdir))


if __name__ == "__main__":
    flags.DEFINE_list("runs", list(DEFAULT_RUNS), f"Tiny-LM runs, from {list(RUNS)}.")
    flags.register_validator("runs", lambda r: bool(r) and set(r) <= set(RUNS),
                             message=f"--runs must name runs from {list(RUNS)}")
    flags.DEFINE_string("corpus", "", "Text file or folder; empty = the Python stdlib source.")
    flags.DEFINE_integer("steps", 400, "Training steps per run.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Sequences per batch.", lower_bound=1)
    flags.DEFINE_integer("seq_len", 64, "Bytes per sequence.", lower_bound=1)
    flags.DEFINE_integer("d_model", 64, "Model width.", lower_bound=4)
    flags.DEFINE_integer("n_layers", 2, "Transformer blocks.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate.", lower_bound=0.0)
    flags.DEFINE_integer("loss_scale_period", 100, "Clean steps before the fp16 loss scale "
                         "doubles.", lower_bound=1)
    flags.DEFINE_integer("eval_batches", 32, "Validation batches for the eval loss.",
                         lower_bound=1)
    flags.DEFINE_bool("census", True, "Count flushed fp16 activation gradients at init and "
                      "after the fp16 run without loss scaling.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
