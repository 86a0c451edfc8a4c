"""Transformer LM, MLP, accounting and mixed-precision training."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from ravine import models
from ravine import optim
from ravine import sharding

LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv", "length"}


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """float32 matmuls in full precision: GPUs default to TF32 (10-bit mantissa) otherwise."""
    with jax.default_matmul_precision("highest"):
        yield


def tiny(**overrides):
    fields = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=4, max_len=16)
    return models.TransformerConfig(**{**fields, **overrides})


def random_tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(vocab, size=shape), jnp.int32)


def random_normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def param_structure(config):
    """The fields that decide the params; policy (fp32 params), remat and attention do not."""
    return dataclasses.replace(config, policy="full", remat="none", attention="xla")


def init_key(seed=0):
    # XLA's RngBitGenerator: the same init distributions, but it compiles several times
    # faster on CPU than the default threefry key.
    return jax.random.key(seed, impl="rbg")


def init(config):
    """Boxed params as `model.init` returns them for `config`'s param structure."""
    return _init(param_structure(config))


@functools.cache  # compiled once per param structure and shared by the tests
def _init(structure):
    model = models.Transformer(structure)
    return jax.jit(model.init)(init_key(), jnp.zeros((1, structure.max_len), jnp.int32))


def abstract_init(config):
    """Boxed params as shape structs: names and counts without compiling anything."""
    return jax.eval_shape(models.Transformer(config).init, jax.random.key(0),
                          jnp.zeros((1, config.max_len), jnp.int32))


def is_box(x):
    return isinstance(x, nn.LogicallyPartitioned)


VARIANTS = {
    "llama": {},
    "gpt2": dict(mlp="gelu", norm="layernorm", position="learned", tie_embeddings=True),
    "chunked": dict(attention="chunked", attention_chunk_size=4),
}


# --- forward pass ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["full", "p=f32,c=bf16,o=f32", "p=f32,c=f16,o=bf16"])
def test_shapes_and_policy_dtypes(spec):
    config = tiny(policy=spec)
    policy = models.get_policy(spec)
    variables = init(config)
    tokens = random_tokens((3, 10), config.vocab_size)
    logits, state = jax.jit(lambda v, t: models.Transformer(config).apply(
        v, t, capture_intermediates=lambda mdl, _: isinstance(mdl, models.Block)))(
            variables, tokens)
    assert logits.shape == (3, 10, config.vocab_size)
    assert logits.dtype == policy.output_dtype
    # fp32 master weights; the residual stream runs in the compute dtype.
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(variables))} == {np.dtype("float32")}
    block_outputs = jax.tree.leaves(state["intermediates"])
    assert len(block_outputs) == config.n_layers
    assert {out.dtype for out in block_outputs} == {policy.compute_dtype}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_changing_future_tokens_leaves_past_logits_unchanged(variant):
    config = tiny(**VARIANTS[variant])
    params = nn.unbox(init(config))
    apply = jax.jit(models.Transformer(config).apply)
    tokens = random_tokens((2, 16), config.vocab_size)
    cut = 9
    changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % config.vocab_size)
    before, after = apply(params, tokens), apply(params, changed)
    np.testing.assert_allclose(before[:, :cut], after[:, :cut], rtol=1e-6, atol=1e-6)
    assert not np.allclose(before[:, cut:], after[:, cut:], atol=1e-3)


def test_sequence_longer_than_max_len_is_rejected():
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_len 8"):
        jax.eval_shape(models.Transformer(tiny(max_len=8)).init, jax.random.key(0),
                       jnp.zeros((1, 9), jnp.int32))


def test_rotary_embedding_makes_scores_depend_on_offset_only():
    q, k = random_normal((2, 8))
    q, k = (jnp.broadcast_to(x, (1, 12, 1, 8)) for x in (q, k))  # same vector at every position

    @jax.jit  # one program (op by op, each op compiles its own); the checks in numpy
    def rotate(q, k):
        rq, rk = models.rotary_embedding(q), models.rotary_embedding(k)
        return rq, jnp.einsum("bqhd,bkhd->qk", rq, rk)

    rq, scores = (np.asarray(x) for x in rotate(q, k))
    for offset in range(-3, 4):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, np.full(diagonal.shape, diagonal[0]), rtol=1e-4,
                                   atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1),
                               rtol=1e-6)


# --- params: names, layout, init ------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_param_carries_logical_axis_names(variant):
    leaves = jax.tree.leaves(abstract_init(tiny(**VARIANTS[variant])), is_leaf=is_box)
    assert leaves and all(is_box(leaf) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape), leaf.names
        assert set(leaf.names) <= LOGICAL_NAMES, leaf.names


def test_megatron_layout_of_the_matrices():
    params = abstract_init(tiny())["params"]
    block = params["block_0"]
    for name in ("query", "key", "value"):
        assert block["attn"][name]["kernel"].names == ("embed", "heads", "kv")
    assert block["attn"]["out"]["kernel"].names == ("heads", "kv", "embed")
    assert block["mlp"]["up"]["kernel"].names == ("embed", "mlp")
    assert block["mlp"]["gate"]["kernel"].names == ("embed", "mlp")
    assert block["mlp"]["down"]["kernel"].names == ("mlp", "embed")
    assert params["embed"]["embedding"].names == ("vocab", "embed")
    assert params["head"]["kernel"].names == ("embed", "vocab")


def test_sharded_forward_matches_unsharded():
    config = tiny()
    model = models.Transformer(config)
    variables = init(config)
    tokens = random_tokens((4, 16), config.vocab_size)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    shardings = sharding.logical_to_shardings(variables, mesh)
    assert shardings["params"]["block_0"]["attn"]["query"]["kernel"].spec == PartitionSpec(
        "fsdp", "tensor")
    params = jax.device_put(nn.unbox(variables), shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        logits = jax.jit(model.apply)(params, jax.device_put(tokens, sharding.batch_sharding(mesh)))
    # The reference applies the boxed params as `init` returned them, on one device.
    np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, tokens), rtol=1e-5,
                               atol=1e-5)


def test_residual_projections_get_scaled_init():
    config = tiny(n_layers=2)
    params = nn.unbox(init(config))["params"]
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for i in range(config.n_layers):
        block = params[f"block_{i}"]
        for kernel, std in [(block["attn"]["out"]["kernel"], residual_std),
                            (block["mlp"]["down"]["kernel"], residual_std),
                            (block["attn"]["query"]["kernel"], config.init_std),
                            (block["mlp"]["up"]["kernel"], config.init_std)]:
            np.testing.assert_allclose(kernel.std(), std, rtol=0.12)


def test_tied_embeddings_use_the_embedding_as_head():
    config = tiny(**VARIANTS["gpt2"])
    variables = nn.unbox(init(config))
    assert "head" not in variables["params"]
    untied = abstract_init(dataclasses.replace(config, tie_embeddings=False))
    assert (models.count_params(untied) - models.count_params(variables)
            == config.d_model * config.vocab_size)

    tokens = random_tokens((2, 8), config.vocab_size)
    logits, state = jax.jit(lambda v, t: models.Transformer(config).apply(
        v, t, capture_intermediates=True))(variables, tokens)
    hidden = state["intermediates"]["final_norm"]["__call__"][0]
    embedding = variables["params"]["embed"]["embedding"]
    np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("mlp", "sigmoid", r"mlp must be one of \['relu', 'gelu', 'swish', 'glu', 'bilinear', "
                       r"'geglu', 'swiglu', 'reglu'\]"),
    ("norm", "batchnorm", "norm must be one of"),
    ("remat", "full", "remat must be one of"),
    ("attention", "flash", "attention must be one of"),
    ("position", "alibi", "position must be one of"),
    ("n_heads", 5, r"n_heads \(5\) must divide d_model \(32\)"),
    ("d_model", 0, "d_model must be a positive integer"),
    ("d_ff", -1, "d_ff must be a positive integer"),
    ("init_std", -0.1, "init_std must be"),
    ("policy", "p=f32,c=fp8", "unknown dtype 'fp8'"),
])
def test_bad_config_is_rejected_at_construction(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{field: value})


def test_default_ff_width():
    assert models.TransformerConfig(d_model=768, mlp="swiglu").ff_dim == 2048
    assert models.TransformerConfig(d_model=256, mlp="swiglu").ff_dim == 704
    assert models.TransformerConfig(d_model=256, mlp="gelu").ff_dim == 1024
    assert models.TransformerConfig(d_model=256, d_ff=100).ff_dim == 100


# --- FFN variants (Shazeer 2020) ------------------------------------------------------------

def _np_gelu(x):  # the tanh approximation, flax's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


# Each variant's formula, transcribed from Shazeer 2020 (arXiv 2002.05202), Section 2.
FFN_FORMULAS = {
    "relu": lambda x, up, gate: np.maximum(x @ up, 0),
    "gelu": lambda x, up, gate: _np_gelu(x @ up),
    "swish": lambda x, up, gate: (x @ up) * _np_sigmoid(x @ up),
    "glu": lambda x, up, gate: _np_sigmoid(x @ gate) * (x @ up),
    "bilinear": lambda x, up, gate: (x @ gate) * (x @ up),
    "geglu": lambda x, up, gate: _np_gelu(x @ gate) * (x @ up),
    "swiglu": lambda x, up, gate: (x @ gate) * _np_sigmoid(x @ gate) * (x @ up),
    "reglu": lambda x, up, gate: np.maximum(x @ gate, 0) * (x @ up),
}


def test_every_ffn_variant_is_known():
    assert set(models.transformer.MLPS) == set(FFN_FORMULAS)


@pytest.mark.parametrize("mlp", sorted(FFN_FORMULAS))
def test_ffn_variant_matches_its_formula(mlp):
    config = tiny(d_model=8, d_ff=12, mlp=mlp)
    layer = models.FeedForward(config)
    x = random_normal((2, 3, 8), seed=1)
    variables = layer.init(init_key(), x)
    params = {name: np.asarray(p["kernel"], np.float64)
              for name, p in nn.unbox(variables)["params"].items()}
    assert set(params) == ({"up", "gate", "down"} if mlp in models.transformer.GATED_MLPS
                           else {"up", "down"})
    # Weights large enough that the activations' nonlinear parts matter.
    params = {name: kernel * 20 for name, kernel in params.items()}
    expected = FFN_FORMULAS[mlp](np.asarray(x, np.float64), params["up"],
                                 params.get("gate")) @ params["down"]
    got = layer.apply({"params": {name: {"kernel": jnp.asarray(kernel, jnp.float32)}
                                  for name, kernel in params.items()}}, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    names = {name: p["kernel"].names for name, p in variables["params"].items()}
    assert names["up"] == ("embed", "mlp") and names["down"] == ("mlp", "embed")


@pytest.mark.parametrize("d_model", [96, 768])
def test_gated_variants_match_non_gated_params_at_default_width(d_model):
    # 3 matrices of 8/3 d against 2 of 4 d: equal when d_model is a multiple of 24.
    counts = {mlp: models.non_embedding_params(models.TransformerConfig(
        d_model=d_model, n_heads=4, n_layers=2, mlp=mlp)) for mlp in FFN_FORMULAS}
    assert counts["relu"] == counts["gelu"] == counts["swish"]
    assert counts["glu"] == counts["bilinear"] == counts["geglu"] == counts["swiglu"] \
        == counts["reglu"]
    assert abs(counts["swiglu"] / counts["gelu"] - 1) <= 0.01


@pytest.mark.parametrize("mlp", sorted(FFN_FORMULAS))
def test_ffn_variant_counts_and_flops_match_the_model(mlp):
    config = tiny(d_model=48, n_heads=4, mlp=mlp)
    params = abstract_init(config)["params"]
    matrices = 3 if mlp in models.transformer.GATED_MLPS else 2
    assert config.ff_dim == (128 if matrices == 3 else 192)
    assert models.count_params(params["block_0"]["mlp"]) == matrices * 48 * config.ff_dim
    non_embedding = models.count_params(params) - models.count_params(
        {k: params[k] for k in ("embed", "head")})
    assert models.non_embedding_params(config) == non_embedding
    assert models.flops_per_token(config) == (6 * (non_embedding + 48 * config.vocab_size)
                                              + 12 * 1 * 48 * config.max_len)


# --- counting -------------------------------------------------------------------------------

def test_count_params_on_boxed_unboxed_and_abstract_trees():
    config = tiny()
    variables = init(config)
    by_hand = sum(np.size(leaf) for leaf in jax.tree.leaves(nn.unbox(variables)))
    assert models.count_params(variables) == by_hand
    assert models.count_params(nn.unbox(variables)["params"]) == by_hand
    assert models.count_params(abstract_init(config)) == by_hand


def test_gpt2_small_has_124m_params():
    config = models.TransformerConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12,
                                      max_len=1024, mlp="gelu", norm="layernorm",
                                      position="learned", tie_embeddings=True)
    abstract = abstract_init(config)
    embedding, positions = 50304 * 768, 1024 * 768
    block = 4 * 768 * 768 + 2 * 768 * 3072 + 2 * (2 * 768)  # attention, MLP, two LayerNorms
    total = embedding + positions + 12 * block + 2 * 768
    assert models.count_params(abstract) == total == 124_392_960


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_non_embedding_params_match_the_model(variant):
    config = tiny(**VARIANTS[variant])
    params = abstract_init(config)["params"]
    outside = {name: params[name] for name in ("embed", "head", "position") if name in params}
    assert (models.non_embedding_params(config)
            == models.count_params(params) - models.count_params(outside))


def test_flops_per_token_hand_count():
    # d=64, 2 layers, swiglu ff=192, vocab 100, T=32, rmsnorm.
    config = models.TransformerConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4,
                                      d_ff=192, max_len=32)
    attention_weights = 4 * 64 * 64        # 16384: Q, K, V, out
    mlp_weights = 3 * 64 * 192             # 36864: gate, up, down
    norms = 2 * 64                         # 128
    n = 2 * (attention_weights + mlp_weights + norms) + 64  # 106816 + final norm
    assert models.non_embedding_params(config) == n == 106_816
    head = 64 * 100
    expected = 6 * (n + head) + 12 * 2 * 64 * 32  # 679296 + 49152
    assert models.flops_per_token(config) == expected == 728_448
    assert models.flops_per_token(config, seq_len=8) == 6 * (n + head) + 12 * 2 * 64 * 8


# --- remat ----------------------------------------------------------------------------------

def lm_loss(model, params, tokens):
    return models.cross_entropy(model.apply(params, tokens[:, :-1]), tokens[:, 1:])


def test_remat_variants_give_the_same_loss_and_gradients():
    config = tiny(n_layers=2)
    params = nn.unbox(init(config))
    tokens = random_tokens((4, 17), config.vocab_size)
    results = {}
    for remat in models.transformer.REMATS:
        model = models.Transformer(dataclasses.replace(config, remat=remat))
        results[remat] = jax.jit(jax.value_and_grad(
            lambda p, model=model: lm_loss(model, p, tokens)))(params)
    loss, grads = results["none"]
    for remat in ("block", "dots"):
        np.testing.assert_allclose(results[remat][0], loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     results[remat][1], grads)


@pytest.mark.parametrize("remat", models.transformer.REMATS)
def test_remat_checkpoints_each_block_with_its_policy(remat):
    config = tiny(n_layers=2, remat=remat)
    params = nn.unbox(init(config))
    tokens = random_tokens((2, 16), config.vocab_size)
    jaxpr = jax.make_jaxpr(lambda p: models.Transformer(config).apply(p, tokens))(params)
    checkpoints = [eqn for eqn in jaxpr.jaxpr.eqns if "policy" in eqn.params]
    if remat == "none":
        assert not checkpoints
    else:
        assert len(checkpoints) == config.n_layers
        expected = models.transformer.REMAT_POLICIES[remat]
        assert all(eqn.params["policy"] is expected for eqn in checkpoints)


# --- loss -----------------------------------------------------------------------------------

def test_cross_entropy_matches_numpy_and_is_float32():
    logits = random_normal((3, 5, 11)) * 3
    targets = random_tokens((3, 5), 11)
    shifted = np.asarray(logits, np.float64)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1).mean()
    np.testing.assert_allclose(models.cross_entropy(logits, targets), expected, rtol=1e-6)
    loss = models.cross_entropy(logits.astype(jnp.bfloat16), targets)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=2e-2)


# --- MLP ------------------------------------------------------------------------------------

def test_mlp_matches_numpy():
    mlp = models.MLP(features=(16, 8, 3), activation=jnp.tanh)
    x = random_normal((5, 4))
    variables = jax.jit(mlp.init)(init_key(), x)  # jitted: one program, not one per op
    layers = nn.unbox(variables)["params"]
    expected = np.asarray(x, np.float64)
    for i in range(3):
        expected = expected @ layers[f"dense_{i}"]["kernel"] + layers[f"dense_{i}"]["bias"]
        expected = np.tanh(expected) if i < 2 else expected
    np.testing.assert_allclose(jax.jit(mlp.apply)(variables, x), expected, rtol=1e-5, atol=1e-6)
    names = [variables["params"][f"dense_{i}"]["kernel"].names for i in range(3)]
    assert names == [("embed", "mlp"), ("mlp", "embed"), ("embed", "mlp")]
    assert variables["params"]["dense_1"]["bias"].names == ("embed",)


def test_mlp_applies_the_policy():
    mlp = models.MLP(features=(8, 2), policy="p=f32,c=bf16,o=f16", use_bias=False)
    x = jnp.ones((3, 4), jnp.float32)
    variables = jax.jit(mlp.init)(init_key(), x)  # jitted: one program, not one per op
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(variables))} == {np.dtype("float32")}
    assert "bias" not in variables["params"]["dense_0"]
    _, state = jax.jit(functools.partial(mlp.apply, capture_intermediates=True))(variables, x)
    assert state["intermediates"]["dense_0"]["__call__"][0].dtype == jnp.bfloat16
    assert jax.jit(mlp.apply)(variables, x).dtype == jnp.float16


@pytest.mark.parametrize("features", [(), (4, 0), (4, 2.5)])
def test_mlp_rejects_bad_features(features):
    with pytest.raises(ValueError, match="features"):
        models.MLP(features=features)


# --- mixed-precision training ---------------------------------------------------------------

# 100 steps: the last 10 steps' mean loss is 1.60 (< 0.8 log 16 = 2.22); bf16 is within
# 0.002% and fp16 within 0.45% of it (the tests allow 2%), with 13 fp16 steps skipped.
TRAIN_STEPS = 100


def markov_batches(vocab=16, batch=16, length=33, seed=0):
    """Token streams from a fixed random bigram chain: a loss floor well above zero."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(vocab, vocab)) * 2.5
    transition = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    cumulative = transition.cumsum(-1)
    tokens = np.empty((TRAIN_STEPS, batch, length), np.int32)
    tokens[:, :, 0] = rng.integers(vocab, size=(TRAIN_STEPS, batch))
    for t in range(1, length):
        u = rng.random((TRAIN_STEPS, batch, 1))
        tokens[:, :, t] = (u > cumulative[tokens[:, :, t - 1]]).sum(-1).clip(max=vocab - 1)
    return jnp.asarray(tokens)


def train(spec, loss_scale=None):
    """Trains a tiny LM for TRAIN_STEPS; returns (mean loss of the last 10 steps, loss scale,
    skipped steps). With a loss scale, steps whose gradients overflow are skipped."""
    config = models.TransformerConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2,
                                      max_len=32, policy=spec)
    model = models.Transformer(config)
    # The params do not depend on the policy (fp32 master weights): one init for all three.
    params = nn.unbox(init(config))
    tx = optim.adam(3e-3)
    loss_scale = loss_scale or optim.NoOpLossScale()

    def step(carry, tokens):
        params, opt_state, loss_scale = carry

        def scaled_loss(p):
            loss = lm_loss(model, p, tokens)
            return loss_scale.scale(loss), loss

        grads, loss = jax.grad(scaled_loss, has_aux=True)(params)
        grads = loss_scale.unscale(grads)
        finite = optim.all_finite(grads)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        params, opt_state = optim.select_tree(
            finite, (optax.apply_updates(params, updates), new_opt_state), (params, opt_state))
        return (params, opt_state, loss_scale.adjust(finite)), (loss, finite)

    # All steps in one program: dispatching a step at a time cost ~5x the steps themselves.
    @jax.jit
    def run(params, loss_scale, batches):
        return jax.lax.scan(step, (params, tx.init(params), loss_scale), batches)

    (params, _, loss_scale), (losses, finite) = run(params, loss_scale, markov_batches())
    assert losses.shape == finite.shape == (TRAIN_STEPS,)
    skipped = int(np.sum(~np.asarray(finite)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    return float(np.mean(losses[-10:])), float(loss_scale.loss_scale), skipped


@pytest.fixture(scope="module")
def fp32_final_loss():
    loss, _, _ = train("full")
    assert loss < 0.8 * math.log(16)  # it learned the chain, not just the unigram mean
    return loss


@pytest.mark.slow
def test_bf16_training_matches_fp32(fp32_final_loss):
    loss, _, skipped = train("p=f32,c=bf16,o=f32")
    assert skipped == 0
    assert abs(loss - fp32_final_loss) <= 0.02 * fp32_final_loss, (loss, fp32_final_loss)


@pytest.mark.slow
def test_fp16_training_with_dynamic_loss_scale_matches_fp32(fp32_final_loss):
    # Starting at 2^30 the scaled logit gradients overflow float16 (max 65504), so the
    # first steps must be skipped and the scale halved until they fit.
    initial_scale = 2.0 ** 30
    loss, final_scale, skipped = train("p=f32,c=f16,o=f32",
                                       optim.DynamicLossScale(scale=initial_scale))
    assert 0 < skipped < 30
    assert final_scale == initial_scale / 2 ** skipped
    assert abs(loss - fp32_final_loss) <= 0.02 * fp32_final_loss, (loss, fp32_final_loss)
