"""μP (parametrization, multipliers, optim.scale_by_multipliers), QK-norm and z-loss."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ravine import models
from ravine import optim


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def config(**overrides):
    fields = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_len=8)
    return models.TransformerConfig(**{**fields, **overrides})


@functools.cache  # compiled once per config and shared by the tests (none mutates them)
def init(cfg, seed=0):
    tokens = jnp.zeros((1, cfg.max_len), jnp.int32)
    return nn.unbox(jax.jit(models.Transformer(cfg).init)(jax.random.key(seed, impl="rbg"),
                                                          tokens))["params"]


def abstract_init(cfg):
    """`init`'s params as shape structs, without compiling anything."""
    tokens = jnp.zeros((1, cfg.max_len), jnp.int32)
    return nn.unbox(jax.eval_shape(models.Transformer(cfg).init, jax.random.key(0, impl="rbg"),
                                   tokens))["params"]


def random_tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(vocab, size=shape), jnp.int32)


def adam_with_multipliers(params, cfg, lr=1e-2, weight_decay=0.0):
    return optax.chain(optim.adamw(lr, weight_decay=weight_decay),
                       optim.scale_by_multipliers(models.mup_lr_multipliers(params, cfg)))


@pytest.mark.parametrize("tie", [False, True])
def test_mup_at_base_width_is_sp_model_and_first_update(tie):
    sp = config(tie_embeddings=tie, qk_norm=True)
    mup = config(tie_embeddings=tie, qk_norm=True, parametrization="mup", base_width=32)
    params_sp, params_mup = init(sp), init(mup)
    jax.tree.map(np.testing.assert_array_equal, params_sp, params_mup)
    tokens = random_tokens((2, 9), 32)

    def first_update(cfg, params):
        model = models.Transformer(cfg)
        loss = lambda p: models.cross_entropy(model.apply({"params": p}, tokens[:, :-1]),
                                              tokens[:, 1:])
        tx = adam_with_multipliers(params, cfg)

        @jax.jit
        def loss_and_update(params):
            value, grads = jax.value_and_grad(loss)(params)
            return value, tx.update(grads, tx.init(params), params)[0]

        return loss_and_update(params)

    (loss_sp, update_sp), (loss_mup, update_mup) = first_update(sp, params_sp), first_update(
        mup, params_mup)
    assert float(loss_sp) == float(loss_mup)
    jax.tree.map(np.testing.assert_array_equal, update_sp, update_mup)


def test_width_ratio_and_attention_scale():
    assert config().attention_scale == pytest.approx(1 / math.sqrt(8))
    assert config(parametrization="mup").width_ratio == 1.0  # base_width None = d_model
    wide = config(d_model=128, parametrization="mup", base_width=32)
    assert wide.width_ratio == 4.0
    # sqrt(d_head_base) / d_head with d_head_base = 32 / 4 = 8 and d_head = 128 / 4 = 32.
    assert wide.attention_scale == pytest.approx(math.sqrt(8) / 32)
    assert config(d_model=128, base_width=32).width_ratio == 1.0  # "sp" ignores it


@pytest.mark.parametrize("field, value, match", [
    ("parametrization", "ntk", "parametrization"),
    ("base_width", 0, "base_width"),
    ("qk_norm", "yes", "qk_norm"),
])
def test_bad_mup_fields_are_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        config(**{field: value})


def test_param_kinds_and_multipliers_per_kind():
    cfg = config(d_model=64, parametrization="mup", base_width=16, qk_norm=True,
                 position="learned", norm="layernorm")
    params = abstract_init(cfg)
    kinds = models.param_kinds(params)
    block = kinds["block_0"]
    assert {k: block["attn"][k]["kernel"] for k in ("query", "key", "value", "out")} == {
        k: "hidden" for k in ("query", "key", "value", "out")}
    assert {k: block["mlp"][k]["kernel"] for k in ("up", "gate", "down")} == {
        k: "hidden" for k in ("up", "gate", "down")}
    assert kinds["embed"]["embedding"] == kinds["position"] == "embedding"
    assert kinds["head"]["kernel"] == "readout"
    assert block["attn"]["query_norm"] == {"scale": "vector", "bias": "vector"}
    assert kinds["final_norm"] == {"scale": "vector", "bias": "vector"}

    expected = {"hidden": 16 / 64, "embedding": 1.0, "readout": 1.0, "vector": 1.0}
    for optimizer in ("adam", "shampoo"):
        multipliers = models.mup_lr_multipliers(params, cfg, optimizer)
        assert jax.tree.map(expected.get, kinds) == multipliers
    for optimizer in ("muon", "soap"):
        assert set(jax.tree.leaves(models.mup_lr_multipliers(params, cfg, optimizer))) == {1.0}
    sp = config(d_model=64, base_width=16)
    assert set(jax.tree.leaves(models.mup_lr_multipliers(abstract_init(sp), sp))) == {1.0}
    with pytest.raises(ValueError, match="optimizer must be one of .* got 'sgd'"):
        models.mup_lr_multipliers(params, cfg, "sgd")


def test_mup_init_std_per_kind():
    base, width, n_layers, std = 32, 256, 2, 0.02
    cfg = config(d_model=width, n_layers=n_layers, n_heads=4, vocab_size=512, mlp="gelu",
                 parametrization="mup", base_width=base)
    params = init(cfg)
    r = width / base
    hidden = std / math.sqrt(r)  # variance ∝ 1/fan_in, SP's std at the base width
    expected = {("embed", "embedding"): std, ("head", "kernel"): std,
                ("block_0", "attn", "query", "kernel"): hidden,
                ("block_1", "mlp", "up", "kernel"): hidden,
                ("block_0", "attn", "out", "kernel"): hidden / math.sqrt(2 * n_layers),
                ("block_1", "mlp", "down", "kernel"): hidden / math.sqrt(2 * n_layers)}
    for path, want in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        # (numpy's std: jnp's compiles a program per leaf shape)
        assert float(np.std(np.asarray(leaf))) == pytest.approx(want, rel=0.03), path
    np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)


@pytest.mark.parametrize("tie", [False, True])
def test_mup_forward_is_sp_with_scaled_queries_and_readout(tie):
    # μP at r = 4 is SP with the same params, except: logits scaled by sqrt(d_head_base)/d_head
    # = (1/sqrt(d_head)) / sqrt(r) (queries scaled by 1/sqrt(r)) and the readout by 1/r.
    r, base = 4, 16
    mup = config(d_model=base * r, parametrization="mup", base_width=base, tie_embeddings=tie)
    sp = config(d_model=base * r, tie_embeddings=tie)
    params = init(mup)
    tokens = random_tokens((2, 8), 32)
    scaled = jax.tree.map_with_path(
        lambda path, x: x / math.sqrt(r) if "query" in jax.tree_util.keystr(path) else x, params)
    logits_mup = jax.jit(models.Transformer(mup).apply)({"params": params}, tokens)
    logits_sp = jax.jit(models.Transformer(sp).apply)({"params": scaled}, tokens)
    np.testing.assert_allclose(logits_mup, logits_sp / r, rtol=1e-5, atol=1e-6)


def test_scale_by_multipliers_matches_per_leaf_scaling_of_adam():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    multipliers = {"w": 0.25, "b": 2.0}
    for tx in (optax.chain(optim.adam(0.1), optim.scale_by_multipliers(multipliers)),
               optax.chain(optim.adam(0.1), optim.scale_by_multipliers(lambda p: multipliers))):
        reference = optax.adam(0.1)
        state, ref_state = tx.init(params), reference.init(params)
        step = jax.jit(tx.update)
        for t in range(5):
            grads = jax.tree.map(lambda p: jnp.sin(p * (t + 1)), params)
            updates, state = step(grads, state, params)
            ref_updates, ref_state = reference.update(grads, ref_state, params)
            for key in params:
                np.testing.assert_allclose(updates[key], multipliers[key] * ref_updates[key],
                                           rtol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x", True])
def test_scale_by_multipliers_rejects_bad_factors(bad):
    with pytest.raises(ValueError, match=r"multipliers must be .* at \['w'\]"):
        optim.scale_by_multipliers({"w": bad, "b": 1.0})
    tx = optim.scale_by_multipliers(lambda params: {"w": bad})
    with pytest.raises(ValueError, match="multipliers must be"):
        tx.init({"w": jnp.zeros(2)})


def test_lr_scaled_weight_decay_is_multiplied_like_mup_adam():
    # Zero gradients: Adam's direction is 0, so the step is the decay alone,
    # -lr * multiplier * wd * w (MuAdam: the group's lr, and with it the decay, is lr / r).
    cfg = config(d_model=64, parametrization="mup", base_width=16)
    params = init(cfg)
    lr, wd = 0.1, 0.5
    tx = adam_with_multipliers(params, cfg, lr, wd)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    multipliers = models.mup_lr_multipliers(params, cfg)
    jax.tree.map(lambda u, p, m: np.testing.assert_allclose(u, -lr * m * wd * p, rtol=1e-6),
                 updates, params, multipliers)
    assert multipliers["block_0"]["mlp"]["up"]["kernel"] == 0.25


def _rank_one_step_norm(tx, n, steps=4):
    """Spectral norm of `tx`'s step on a square n x n matrix after `steps` equal rank-1
    gradients a b^T (the μP setting: hidden gradients are sums of outer products)."""
    rng = np.random.default_rng(n)
    grads = {"w": jnp.asarray(np.outer(rng.normal(size=n), rng.normal(size=n)), jnp.float32)}
    params = {"w": jnp.zeros((n, n), jnp.float32)}
    state, update = tx.init(params), jax.jit(tx.update)  # Shampoo's update op by op: 2x slower
    for _ in range(steps):
        updates, state = update(grads, state, params)
    return float(np.linalg.norm(np.asarray(updates["w"]), 2))  # (numpy: no SVD to compile)


@pytest.mark.parametrize("name, make", [
    ("adam", lambda: optim.adam(1.0)),
    ("shampoo", lambda: optim.shampoo(1.0, start_preconditioning_step=1, precondition_every=1)),
    ("muon", lambda: optim.muon(1.0)),
    # SOAP is not here: on an exactly rank-1 gradient its step is round-off (models/mup.py).
])
def test_mup_multipliers_make_hidden_steps_width_independent(name, make):
    # What the docstring of models.mup claims, per optimizer family: with the multipliers of
    # `optimizer=name`, a hidden matrix's step has the same spectral norm at widths 32 and
    # 128; without them, Adam's and Shampoo's steps grow 4x.
    small, wide = (config(d_model=d, parametrization="mup", base_width=32) for d in (32, 128))
    multiplier = {}
    for cfg in (small, wide):
        params = abstract_init(cfg)
        multiplier[cfg.d_model] = models.mup_lr_multipliers(params, cfg, name)[
            "block_0"]["mlp"]["up"]["kernel"]
    norms = {d: _rank_one_step_norm(make(), d) for d in (32, 128)}
    assert norms[128] * multiplier[128] == pytest.approx(norms[32] * multiplier[32], rel=0.05)
    if name in ("adam", "shampoo"):
        assert norms[128] / norms[32] == pytest.approx(4.0, rel=0.05)


def test_qk_norm_matches_hand_computation():
    # One attention layer with RMSNorm on q and k per head (learned scales), learned
    # positions (no rotary), in float64 numpy.
    cfg = config(d_model=16, n_heads=2, qk_norm=True, position="learned")
    module = models.CausalSelfAttention(cfg)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 16)), jnp.float32)
    # Jitted: op by op, the init and the layer compile twice as long.
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x))["params"]
    rng = np.random.default_rng(2)
    params["query_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32)
    params["key_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32)
    got, state = jax.jit(functools.partial(module.apply, mutable=["attention_stats"]))(
        {"params": params}, x)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dhk->bthk", xs, p[n]["kernel"]) for n in ("query", "key", "value"))
    rms = lambda a: a / np.sqrt(np.mean(a**2, axis=-1, keepdims=True) + 1e-6)
    q, k = rms(q) * p["query_norm"]["scale"], rms(k) * p["key_norm"]["scale"]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    causal = np.tril(np.ones((5, 5), bool))
    masked = np.where(causal, logits, -np.inf)
    weights = np.exp(masked - masked.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", weights, v)
    want = np.einsum("bqhd,hde->bqe", y, p["out"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The sown max logit: the largest causal logit; with unit-RMS q, k it is at most
    # |q||k|/sqrt(d) <= sqrt(d) * max scale^2.
    max_logit = state["attention_stats"]["max_logit"][0]
    np.testing.assert_allclose(max_logit, logits[:, :, causal].max(), rtol=1e-5)
    assert max_logit <= math.sqrt(8) * 4


def test_z_loss_matches_hand_computation():
    logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]], np.float32)
    targets = np.array([[0, 1]])
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ce = np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
    z = 1e-4 * np.mean(log_z**2)
    loss, metrics = models.lm_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                   targets, z_loss=1e-4)
    assert float(metrics["cross_entropy"]) == pytest.approx(ce, rel=1e-6)
    assert float(metrics["z_loss"]) == pytest.approx(z, rel=1e-6)
    assert float(metrics["log_z_sq"]) == pytest.approx(np.mean(log_z**2), rel=1e-6)
    assert float(loss) == pytest.approx(ce + z, rel=1e-6)
    assert float(models.cross_entropy(logits, targets, z_loss=1e-4)) == pytest.approx(
        ce + z, rel=1e-6)
    assert float(models.cross_entropy(logits, targets)) == pytest.approx(ce, rel=1e-6)
    # The z-loss gradient: d/dlogits z * log(Z)^2 = 2 z log(Z) softmax(logits), per position,
    # averaged over the 2 positions.
    grad_z = jax.grad(lambda lg: models.lm_loss(lg, targets, 1e-4)[1]["z_loss"])(
        jnp.asarray(logits))
    softmax = np.exp(logits - log_z[..., None])
    np.testing.assert_allclose(grad_z, 2 * 1e-4 * log_z[..., None] * softmax / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="z_loss must be .* got -1"):
        models.lm_loss(logits, targets, z_loss=-1)


def test_init_holds_params_only():
    # The attention logit statistics are recorded on request in apply, never in init.
    variables = jax.eval_shape(models.Transformer(config(qk_norm=True)).init,
                               jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert set(variables) == {"params"}
