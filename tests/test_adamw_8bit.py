"""8-bit AdamW: the dynamic code map and block-wise quantization against a numpy reference,
tracking float32 AdamW, robustness, state bytes and sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ravine import optim
from ravine import sharding
from ravine.experiments.benchmarks.bench_optimizers import transformer_shapes
from ravine.optim import quantization


def reference_code_map(signed):
    """The dynamic tree data type read off its bit patterns (Dettmers, 2016): a sign bit
    (signed only), a run of e zeros giving 10^-e, a one, then linear fraction bits whose
    2^bits values are interval midpoints in [0.1, 1]. The all-zero pattern is 0; the one
    left over (sign alone, or the longest run) stands for 1.0."""
    width = 7 if signed else 8
    values = []
    for byte in range(256):
        sign = -1.0 if signed and byte >> 7 else 1.0
        rest = byte & ((1 << width) - 1)
        if rest == 0:
            values.append(0.0 if sign > 0 else 1.0)
            continue
        zeros = width - rest.bit_length()
        fraction_bits = width - zeros - 1
        if not signed and fraction_bits == 0:  # 00000001: the unsigned map's 1.0
            values.append(1.0)
            continue
        count = 2 ** fraction_bits
        fraction = rest & (count - 1)
        midpoint = 0.1 + 0.9 * (fraction + 0.5) / count
        values.append(sign * 10.0 ** -zeros * midpoint)
    return np.sort(np.asarray(values, np.float64))


def reference_round_trip(x, block_size, signed, keep_nonzero=False):
    """Nearest-code block-wise quantization in float64 numpy (brute force over 256 codes);
    with `keep_nonzero`, the nearest nonzero code for a nonzero value."""
    codes = reference_code_map(signed)
    flat = np.pad(x.ravel().astype(np.float64), (0, -x.size % block_size))
    blocks = flat.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normalized = blocks / np.where(absmax > 0, absmax, 1)
    distance = np.abs(normalized[..., None] - codes)
    if keep_nonzero:
        distance[..., codes == 0] = np.where(normalized == 0, 0.0, np.inf)[..., None]
    nearest = distance.argmin(axis=-1)
    return (codes[nearest] * absmax).ravel()[:x.size].reshape(x.shape), nearest


@pytest.mark.parametrize("signed", [True, False])
def test_code_map_is_the_dynamic_tree_type(signed):
    np.testing.assert_allclose(quantization.dynamic_code_map(signed),
                               reference_code_map(signed), rtol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_matches_numpy_and_its_error_bound(signed):
    rng = np.random.default_rng(0)
    # Heavy tails within blocks, a zero block, a block of tiny values, a partial last block.
    x = rng.standard_t(2, size=(5 * 512 + 100,)).astype(np.float32)
    x[512:1024] = 0.0
    x[1024:1536] *= 1e-30
    if not signed:
        x = np.square(x)
    x = x.reshape(-1, 4) if x.size % 4 == 0 else x
    quantized = jax.jit(quantization.quantize, static_argnums=(1, 2))(jnp.asarray(x), 512, signed)
    assert quantized.codes.shape == x.shape
    assert quantized.codes.dtype == (jnp.int8 if signed else jnp.uint8)
    assert quantized.scales.shape == (6,)
    ours = np.asarray(quantization.dequantize(quantized, 512, signed))
    expected, _ = reference_round_trip(x, 512, signed)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    # The bound: each value is off by at most half the gap between the two codes around it
    # (or its distance to -0.993, the signed map's lowest code), times its block's absmax.
    codes = reference_code_map(signed)
    flat = np.pad(x.ravel(), (0, -x.size % 512)).reshape(-1, 512).astype(np.float64)
    absmax = np.abs(flat).max(axis=1, keepdims=True)
    normalized = flat / np.where(absmax > 0, absmax, 1)
    above = np.clip(np.searchsorted(codes, normalized), 1, 255)
    half_gap = np.where(normalized < codes[0], codes[0] - normalized,
                        (codes[above] - codes[above - 1]) / 2)
    error = np.abs(np.pad(ours.ravel(), (0, -x.size % 512)).reshape(flat.shape) - flat)
    # (float32 rounding of code * absmax adds up to ~1e-7 of the value itself)
    assert np.all(error <= half_gap * absmax + 1e-6 * np.abs(flat))
    assert np.all(ours.ravel()[512:1024] == 0)


@pytest.mark.parametrize("signed", [True, False])
def test_keep_nonzero_gives_the_nearest_nonzero_code_and_zero_only_to_zeros(signed):
    """How 8-bit AdamW stores `v` (unsigned) by default: only a zero decodes to zero."""
    rng = np.random.default_rng(1)
    x = rng.standard_t(2, size=(4 * 256,)).astype(np.float32)
    x[::7] *= 1e-9  # far below the smallest code (~3e-7 of the block's absmax)
    x[::11] = 0.0
    if not signed:
        x = np.square(x)
    quantize = jax.jit(quantization.quantize, static_argnums=(1, 2, 3))
    ours = np.asarray(quantization.dequantize(quantize(jnp.asarray(x), 256, signed, True),
                                              256, signed))
    expected, _ = reference_round_trip(x, 256, signed, keep_nonzero=True)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    assert np.all((ours == 0) == (x == 0))
    assert np.all(np.sign(ours) == np.sign(x))
    # and nearest rounding (the default of `quantize`) does send the tiny ones to 0
    nearest = np.asarray(quantization.dequantize(quantize(jnp.asarray(x), 256, signed, False),
                                                 256, signed))
    assert np.all(nearest[::7] == 0)


@pytest.mark.parametrize("nu_rounds_to_zero", [False, True])
def test_second_moment_zero_point(nu_rounds_to_zero):
    """A block where one gradient is 3000x the others: their v is 1.1e-7 of the block's
    largest, below the smallest code's midpoint. Rounded to the nearest code (the paper),
    it is stored as 0 and the next direction `m / sqrt(v)` comes out 5x float32 Adam's
    after 20 steps (and growing); rounded up (the default) it stays below Adam's (v stored
    as at least the smallest code, 3.25e-7 of the largest) and within 2x of it."""
    grads = jnp.full((1024,), 1 / 3000).at[0].set(1.0)
    ours = optim.scale_by_adam_8bit(block_size=256, min_8bit_size=0,
                                    nu_rounds_to_zero=nu_rounds_to_zero)
    adam = optax.scale_by_adam()
    states = [ours.init(grads), adam.init(grads)]
    steps = [jax.jit(ours.update), jax.jit(adam.update)]
    for _ in range(20):
        (direction, states[0]), (expected, states[1]) = [
            step(grads, state) for step, state in zip(steps, states)]
    ratio = np.asarray(direction / expected)
    np.testing.assert_allclose(ratio[0], 1.0, rtol=1e-2)  # the block's largest
    np.testing.assert_allclose(ratio[256:], 1.0, rtol=1e-2)  # blocks of equal gradients
    small = ratio[1:256]
    if nu_rounds_to_zero:
        assert np.all(small > 4.5), small.min()
    else:
        assert np.all((small > 0.5) & (small <= 1.0)), (small.min(), small.max())


def _regression(seed=0, n=256, d=64, k=64):
    keys = jax.random.split(jax.random.key(seed), 3)
    inputs = jax.random.normal(keys[0], (n, d))
    true_w = jax.random.normal(keys[1], (d, k)) / np.sqrt(d)
    targets = inputs @ true_w + 0.3 * jax.random.normal(keys[2], (n, k))
    return lambda w: jnp.mean(jnp.square(inputs @ w["w"] + w["b"] - targets))


def _train(tx, loss, steps=300):
    params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros((64,))}

    def body(carry, _):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    (params, _), losses = jax.jit(
        lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(params)
    return float(loss(params)), np.asarray(losses)


def test_tracks_float32_adamw_on_a_regression():
    """Every leaf quantized (min_8bit_size=0), blocks smaller than the 4096-weight matrix:
    the final loss is within 2% of float32 AdamW's, and the curves agree all along."""
    loss = _regression()
    ours, ours_curve = _train(optim.adamw_8bit(1e-2, weight_decay=0.01, block_size=1024,
                                               min_8bit_size=0), loss)
    theirs, theirs_curve = _train(optim.adamw(1e-2, weight_decay=0.01), loss)
    assert theirs < 0.5 * theirs_curve[0]  # it learned something
    assert abs(ours - theirs) / theirs < 0.02, (ours, theirs)
    np.testing.assert_allclose(ours_curve, theirs_curve, rtol=0.05)


@pytest.mark.parametrize("scale", [0.0, 1e15, 1e-30])
def test_zero_huge_and_tiny_gradients_stay_finite_and_follow_adamw(scale):
    """Zero blocks, gradients whose squares reach 1e30 and ones whose squares underflow:
    finite state and updates, close to float32 AdamW's (which are ~lr, or decay alone)."""
    ours, theirs = (optim.adamw_8bit(1e-3, min_8bit_size=0, block_size=256),
                    optim.adamw(1e-3))
    params = {"w": jnp.ones((32, 32))}
    states = [ours.init(params), theirs.init(params)]
    steps = [jax.jit(ours.update), jax.jit(theirs.update)]
    for step in range(5):
        grads = {"w": scale * jax.random.normal(jax.random.key(step), (32, 32))}
        (ours_updates, states[0]), (theirs_updates, states[1]) = [
            update(grads, state, params) for update, state in zip(steps, states)]
        for leaf in jax.tree.leaves((ours_updates, states[0])):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
        difference = np.abs(ours_updates["w"] - theirs_updates["w"])
        assert difference.max() < 0.25e-3 and np.median(difference) < 0.02e-3, difference
        if scale == 0.0:  # only the decay moves the params
            np.testing.assert_allclose(ours_updates["w"], -1e-3 * 1e-4 * params["w"], rtol=1e-6)


def test_state_bytes_per_param_on_a_transformer_tree():
    shapes = transformer_shapes(d_model=128, n_layers=2, vocab_size=512, d_ff=512)
    params = jax.tree.map(lambda shape: jnp.zeros(shape), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    n = sum(p.size for p in jax.tree.leaves(params))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    state = optim.adamw_8bit(1e-3).init(params)
    assert nbytes(state) / n <= 2.1, nbytes(state) / n
    assert nbytes(optim.adamw(1e-3).init(params)) / n == pytest.approx(8.0, abs=1e-3)
    # Small leaves (the norm gains) keep float32 moments; the matrices are 8-bit.
    moments = state[0].mu
    assert moments["final_norm"]["scale"].dtype == jnp.float32
    assert isinstance(moments["head"]["kernel"], quantization.QuantizedArray)


def test_codes_shard_like_the_params():
    mesh = sharding.make_mesh("data=2,tensor=4")
    params = {"w": jnp.ones((64, 256)), "b": jnp.ones((256,))}
    param_sh = {"w": NamedSharding(mesh, P(None, "tensor")), "b": NamedSharding(mesh, P())}
    params = jax.device_put(params, param_sh)
    tx = optim.adamw_8bit(1e-3, block_size=512, min_8bit_size=1024)
    state_sh = sharding.optimizer_state_shardings(tx, params, param_sh, zero=0)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    codes = state[0].mu["w"].codes
    assert codes.sharding.spec == P(None, "tensor")
    update = jax.jit(tx.update, out_shardings=(param_sh, state_sh))
    updates, state = update(jax.tree.map(lambda p: 0.1 * p, params), state, params)
    assert state[0].nu["w"].codes.sharding.spec == P(None, "tensor")
    np.testing.assert_allclose(updates["w"], -1e-3 * (1 + 1e-4), rtol=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size"), (dict(min_8bit_size=-1), "min_8bit_size"),
    (dict(b1=1.0), "b1"), (dict(b2=2.0), "b2"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-1.0), "weight_decay")])
def test_bad_hyperparameters_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.adamw_8bit(1e-3, **kwargs)
