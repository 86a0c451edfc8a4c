"""Issue 31's precision lesson (experiments.demos.precision_limits) and the library pieces it
added: `optim.stochastic_round`, `optim.apply_updates_stochastic` and `Policy(matmul="fp8")`.
Each claim is checked in-process on a small setting against a closed form or a computed
value."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine.experiments.demos import precision_limits as pl

F16, BF16 = jnp.float16, jnp.bfloat16
FP8 = models.FP8_COLLECTION


class TinyLM(nn.Module):
    """embed -> x + down(gelu(up(x))), times a gain at 1.0 -> head: the transformer's layers
    (`models.layers.Dense` with the policy, the head out of fp8) at a fraction of its
    compile time. The gain plays the norm scales' part: a weight of 1.0."""
    policy: str
    vocab: int = 64
    width: int = 32

    @nn.compact
    def __call__(self, tokens):
        policy = models.get_policy(self.policy)
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab, self.width, dtype=policy.compute_dtype,
                     param_dtype=policy.param_dtype)(tokens)
        h = models.layers.Dense((4 * self.width,), ("embed", "mlp"), policy, init, name="up")(x)
        h = models.layers.Dense((self.width,), ("mlp", "embed"), policy, init,
                                name="down")(nn.gelu(h))
        gain = self.param("gain", nn.initializers.ones_init(), (self.width,),
                          policy.param_dtype)
        x = (x + h) * gain.astype(policy.compute_dtype)
        head = dataclasses.replace(policy, matmul="compute")
        logits = models.layers.Dense((self.vocab,), ("embed", "vocab"), head, init,
                                     name="head")(x)
        return policy.cast_to_output(logits)


def init_tiny(policy, tokens):
    """float32 params (cast to the policy's param dtype) and the fp8 collection, if any.

    The init is jitted: one compile instead of op-by-op dispatch (3.5 of this file's CPU
    seconds, most of them the fp8 model's); its values agree with the eager init's to
    an ulp of the normal sampler."""
    f32 = dataclasses.replace(models.get_policy(policy), param_dtype=np.float32)
    variables = nn.unbox(jax.jit(TinyLM(str(f32)).init)(jax.random.key(0), tokens[:, :-1]))
    params32 = variables["params"]
    fp8 = {FP8: variables[FP8]} if FP8 in variables else {}
    return params32, models.get_policy(policy).cast_to_param(params32), fp8

# --- the vanishing update ------------------------------------------------------------------


@pytest.mark.parametrize("dtype,first,certain", [(F16, 2048, 4096), (BF16, 256, 512)])
def test_update_vanishes_from_2_to_the_p_and_always_from_2_to_the_p_plus_1(dtype, first,
                                                                             certain):
    assert pl.vanishing_ratios(dtype) == (first, certain)
    one = jnp.ones((), dtype)
    # At w = 1 the spacing above is 2/first: u = 1/first is a tie, which rounds to even (1).
    assert one + jnp.asarray(1.0 / first, dtype) == one
    assert one + jnp.asarray(1.0 / (first - 1), dtype) != one  # any ratio below: it moves
    # Below a power of two the spacing halves: toward zero, 1/first is representable.
    assert one - jnp.asarray(1.0 / first, dtype) != one
    assert one - jnp.asarray(1.0 / certain, dtype) == one
    # Every w in [1, 2), both signs, ratios 2^(k/16): the closed form equals the arithmetic,
    # nothing vanishes below 2^p and everything from 2^(p+1) on.
    ratios = np.exp2(np.linspace(math.log2(first) - 2, math.log2(certain) + 1, 65))
    sweep = pl.vanishing_sweep(dtype, ratios)
    assert sweep["mismatches_up"] == sweep["mismatches_down"] == 0
    assert sweep["first_ratio_any"] == first and sweep["first_ratio_all"] == certain
    below = ratios < first
    assert not np.any(np.asarray(sweep["measured_up"])[below])
    # Between the two the vanishing share grows as clip(r / 2^p - 1, 0, 1) (u > 0).
    np.testing.assert_allclose(sweep["measured_up"], sweep["limit_up"],
                               atol=2.0 / len(pl.grid_in_one_binade(dtype)))


def test_many_small_updates_stall_in_bf16_and_add_up_with_stochastic_rounding():
    acc = pl.accumulate_small_updates(steps=500, ratio=1000.0, copies=256)
    assert acc["bf16_nearest"] == acc["bf16_truncate"] == 1.0  # every update lost
    assert acc["fp32"] == pytest.approx(1.5, abs=1e-4)
    standard_error = acc["bf16_stochastic_std"] / math.sqrt(acc["copies"])
    assert abs(acc["bf16_stochastic_mean"] - 1.5) < 4 * standard_error + 1e-3


# --- fp32 -> bf16: round to nearest even vs truncation -------------------------------------


def test_rne_and_truncation_errors_match_their_closed_forms():
    x = jnp.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8 + 2**-16), 1.0 - 2**-24])
    np.testing.assert_array_equal(pl.truncate_to_bfloat16(x).astype(jnp.float32),
                                  [1.0, 1.0 + 2**-7, -1.0, 1.0 - 2**-8])
    np.testing.assert_array_equal(x.astype(BF16).astype(jnp.float32),  # ties to even
                                  [1.0, 1.0 + 2**-6, -(1.0 + 2**-7), 1.0])
    errors = pl.conversion_errors(n=200_000)
    assert errors["rne_matches_astype"]
    closed = errors["closed_form"]
    for mode in ("rne", "truncate"):
        assert errors[mode]["max_abs"] <= closed[mode]["max_abs"]
        assert errors[mode]["max_abs"] > 0.98 * closed[mode]["max_abs"]
        assert errors[mode]["mean_abs"] == pytest.approx(closed[mode]["mean_abs"], rel=0.01)
    assert abs(errors["rne"]["mean"]) < 2e-5  # unbiased (closed form 0)
    assert errors["truncate"]["mean"] == pytest.approx(closed["truncate"]["mean"], rel=0.01)
    assert closed["truncate"]["max_abs"] == 2 * closed["rne"]["max_abs"] == 2.0**-7


# --- stochastic rounding (optim.low_precision) ---------------------------------------------


round_jit = jax.jit(optim.stochastic_round, static_argnums=1)


@pytest.mark.parametrize("dtype", [BF16, F16])  # the integer path and the generic one
def test_stochastic_round_is_unbiased_and_picks_a_neighbour(dtype):
    x = jnp.concatenate([jax.random.normal(jax.random.key(0), (62,)),
                         jnp.array([1.0 + 2.0**-10, -3.0 - 2.0**-9])])
    draws = round_jit(jnp.broadcast_to(x, (4096, x.size)), dtype, jax.random.key(1))
    assert draws.dtype == dtype
    lo = jnp.nextafter(x.astype(dtype), jnp.asarray(-jnp.inf, dtype)).astype(jnp.float32)
    hi = jnp.nextafter(x.astype(dtype), jnp.asarray(jnp.inf, dtype)).astype(jnp.float32)
    values = draws.astype(jnp.float32)
    assert bool(jnp.all((values >= lo) & (values <= hi)))
    spacing = hi - lo  # two spacings, around x's nearest value
    bias = values.mean(axis=0) - x
    # Each draw errs by at most one spacing, so the mean of 4096 is within spacing * 4/64.
    assert bool(jnp.all(jnp.abs(bias) < spacing * 4 / 64)), float(jnp.max(jnp.abs(bias) / spacing))
    # Over all 64 numbers the mean bias is far below round-to-nearest's worst (1/2 spacing).
    assert float(jnp.abs(bias / spacing).mean()) < 0.02


def test_stochastic_round_keeps_representable_and_non_finite_values():
    key = jax.random.key(0)
    exact = jnp.array([0.0, 1.0, -2.5, 2.0**-20, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    for dtype in (BF16, F16):
        out = round_jit(exact, dtype, key)
        np.testing.assert_array_equal(out, exact.astype(dtype))  # NaN == NaN here
    widened = optim.stochastic_round(jnp.ones(3, BF16), jnp.float32, key)  # exact widening
    assert widened.dtype == jnp.float32
    with pytest.raises(ValueError, match="floating"):
        optim.stochastic_round(jnp.arange(3), BF16, key)


def test_apply_updates_stochastic_is_optax_for_wide_params_and_unbiased_for_bf16():
    apply = jax.jit(optim.apply_updates_stochastic)
    key = jax.random.key(0)
    params = {"w": jnp.linspace(-1, 1, 5), "b": None}
    updates = {"w": jnp.full(5, 1e-9), "b": None}
    got = apply(params, updates, key)
    np.testing.assert_array_equal(got["w"], optax.apply_updates(params, updates)["w"])
    assert got["b"] is None
    low = {"w": jnp.ones(50_000, BF16), "s": jnp.full(50_000, 4.0, BF16)}
    small = {"w": jnp.full(50_000, 1e-3), "s": jnp.full(50_000, -1e-3)}  # ratios 1000, 4000
    nearest = optax.apply_updates(low, small)
    assert bool(jnp.all(nearest["w"] == 1)) and bool(jnp.all(nearest["s"] == 4))
    new = apply(low, small, key)
    assert new["w"].dtype == new["s"].dtype == BF16
    assert float(new["w"].astype(jnp.float32).mean()) == pytest.approx(1.001, abs=2e-4)
    assert float(new["s"].astype(jnp.float32).mean()) == pytest.approx(3.999, abs=8e-4)


def test_stochastic_rounding_recovers_the_master_weights_gap_on_a_small_problem():
    # Gradient descent on 1/2 |w - w*|^2 with bf16 params: lr * |w - w*| falls below half
    # bf16's spacing (|w| ~ 1-2) long before convergence, so round-to-nearest stops.
    d, lr, steps = 256, 0.01, 600
    target = 1.0 + jax.random.uniform(jax.random.key(0), (d,))
    w0 = jnp.full((d,), 1.5, jnp.float32)

    def descend(apply, w):
        def step(w, key):
            return apply(w, -lr * (w.astype(jnp.float32) - target), key), None
        return jax.lax.scan(step, w, jax.random.split(jax.random.key(1), steps))[0]

    def loss(w):
        return float(0.5 * jnp.sum((w.astype(jnp.float32) - target) ** 2))

    master = loss(descend(lambda w, u, k: w + u, w0))
    nearest = loss(descend(lambda w, u, k: (w.astype(jnp.float32) + u).astype(BF16),
                           w0.astype(BF16)))
    stochastic = loss(descend(lambda w, u, k: optim.apply_updates_stochastic(w, u, k),
                              w0.astype(BF16)))
    floor = d * (2.0**-7) ** 2  # a squared spacing per coordinate: bf16 can do no better
    assert master < 1e-3 < floor < nearest
    assert (nearest - stochastic) / (nearest - master) > 0.9
    assert stochastic < floor


# --- float8 matmuls (Policy(matmul="fp8")) and the fp16 control -----------------------------


def test_fp8_policy_puts_scales_in_the_owg_collection_and_keeps_the_head_out():
    policy = models.get_policy("p=f32,c=bf16,o=f32,matmul=fp8")
    assert policy.matmul == "fp8" and str(policy).endswith(",matmul=fp8")
    assert models.get_policy(str(policy)) == policy
    assert models.get_policy("p=f32,c=bf16").matmul == "compute"  # the default is unchanged
    config = models.TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                      max_len=8, policy=str(policy))
    variables = jax.eval_shape(models.Transformer(config).init, jax.random.key(0),
                               jnp.zeros((2, 8), jnp.int32))
    ops = {path[:-1] for path in _paths(variables[FP8])}
    assert ops == {("block_0", "attn", name, "fp8") for name in ("query", "key", "value", "out")
                   } | {("block_0", "mlp", name, "fp8") for name in ("up", "gate", "down")}
    plain = jax.eval_shape(models.Transformer(dataclasses.replace(config, policy="c=bf16")).init,
                           jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    assert set(plain) == {"params"}
    assert jax.tree.structure(plain["params"]) == jax.tree.structure(variables["params"])


def _paths(tree):
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class _Spy:
    """An optax transform that records the pytree paths of every update it is handed."""

    def __init__(self):
        self.seen = []

    def transform(self):
        def update(updates, state, params=None):
            self.seen += _paths(updates)
            return updates, state
        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_fp8_model_trains_and_its_owg_collection_is_overwritten_not_optimized():
    policy = "p=f32,c=bf16,o=f32,matmul=fp8"
    model = TinyLM(policy)
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64) % 7  # learnable
    params, _, fp8 = init_tiny(policy, tokens)
    assert {path[0] for path in _paths(fp8[FP8])} == {"up", "down"}  # not the head
    spy = _Spy()
    tx = optax.chain(spy.transform(), optim.adamw(1e-2, weight_decay=0.1))
    state = pl.RunState(jnp.zeros((), jnp.int32), params, fp8, tx.init(params),
                        optim.NoOpLossScale(), jax.random.key(1))
    step = jax.jit(pl.make_train_step(model, tx, "master"))
    states, losses = [], []
    for _ in range(10):
        state, metrics = step(state, tokens)
        states.append(state)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0]
    # The optimizer saw the params only: no fp8 path, no state for it.
    assert spy.seen and all(path[0] != FP8 and "fp8" not in path for path in spy.seen)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
    # The step overwrote the collection with flax's new values (delayed scaling): step 1
    # records the kernel's amax and keeps scale 1; step 2 scales by step 1's amax / 448.
    for layer in ("up", "down"):
        kernel = params[layer]["kernel"].astype(jnp.bfloat16)  # as the matmul sees it
        first, second = (s.fp8[FP8][layer]["fp8"] for s in states[:2])
        assert float(first["kernel_amax_history"][0]) == float(jnp.max(jnp.abs(kernel)))
        assert float(first["kernel_scale"][0]) == 1.0
        assert float(second["kernel_scale"][0]) == pytest.approx(
            float(first["kernel_amax_history"][0]) / 448, rel=1e-6)
        assert float(state.fp8[FP8][layer]["fp8"]["output_grad_scale"][0]) != 1.0


def test_fp16_without_loss_scaling_flushes_activation_gradients_below_2_to_the_minus_25():
    assert jnp.asarray(2.0**-24, F16) > 0 and jnp.asarray(2.0**-25, F16) == 0  # tie to even
    tokens = jax.random.randint(jax.random.key(0), (64, 65), 0, 64)
    params, _, _ = init_tiny("p=f32", tokens)
    census = pl.underflow_census(TinyLM, params, tokens)
    # What float32 puts below 2^-25 (up to rounding in the fp16 backward pass) is zero in
    # float16; a loss scale of 2^15 moves it back into range.
    assert census["fp32_below_2^-25"] > 0.005
    assert census["fp16_flushed"] == pytest.approx(census["fp32_below_2^-25"], rel=0.1)
    assert census["fp16_scaled_flushed"] < 0.05 * census["fp16_flushed"]
    assert census["fp32_below_2^-24"] >= census["fp32_below_2^-25"]


def test_bf16_params_in_the_lm_step_keep_updates_below_the_spacing_by_stochastic_rounding():
    policy = "p=bf16,c=bf16,o=f32"
    tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
    params32, params, _ = init_tiny(policy, tokens)
    tx = optim.adamw(1e-3, weight_decay=0.1, mask=optim.decay_mask)
    state = pl.RunState(jnp.zeros((), jnp.int32), params, {}, tx.init(params32),
                        optim.NoOpLossScale(), jax.random.key(1))
    new, metrics = jax.jit(pl.make_train_step(TinyLM(policy), tx, "stochastic"))(state, tokens)
    assert jax.tree.map(lambda x: x.dtype, new.params) == jax.tree.map(lambda x: x.dtype, params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    # Adam's first step is lr * sign(g) = 1e-3: on the gain (1.0, ratio 1000 > 512) it is
    # below half of bf16's spacing, lost to round-to-nearest (optax.apply_updates); on the
    # matrices (|w| ~ 0.02, ratio ~ 20) it is not.
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert 32 / n_params <= float(metrics["ratio_ge_256"]) < 0.2
    nearest = optax.apply_updates(params["gain"], jnp.full(32, 1e-3))
    assert bool(jnp.all(nearest == params["gain"]))
    # Stochastic rounding moves each gain entry by one spacing (2^-8 below 1, 2^-7 above)
    # with probability ~ 1e-3 / spacing (13-26%): a few of the 32 move, not all.
    moved = int(jnp.sum(new.params["gain"] != params["gain"]))
    assert 1 <= moved <= 16
    assert float(metrics["vanished"]) >= (32 - moved) / n_params
    with pytest.raises(ValueError, match="rounding"):
        pl.apply_updates({}, {}, "floor", None)


def test_train_job_refuses_fp8_matmuls_it_cannot_carry():
    import ml_collections
    from ravine.experiments.runtime import builders
    config = ml_collections.ConfigDict({"precision": "p=f32,c=bf16,o=f32,matmul=fp8"})
    with pytest.raises(ValueError, match="matmul=fp8 is not supported by the train job"):
        builders.check_precision(config)
