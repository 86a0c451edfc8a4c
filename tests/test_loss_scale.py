"""Loss scales: round trips per dtype, the dynamic rule step by step, pytree behaviour, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravine import optim
from ravine.optim import DynamicLossScale, NoOpLossScale, StaticLossScale, all_finite, select_tree

FLOAT_DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]


def tree_of(dtype):
    # Multiples of 1/2 up to 6: exact in every float dtype above, also times 2**8.
    values = np.arange(-12, 13, dtype=np.float32).reshape(5, 5) / 2
    return {"w": jnp.asarray(values, dtype), "b": jnp.asarray(values[0], dtype),
            "step": jnp.arange(3)}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("loss_scale", [StaticLossScale(2.0 ** 8), DynamicLossScale(2.0 ** 8)],
                         ids=["static", "dynamic"])
def test_scale_unscale_round_trip(loss_scale, dtype):
    tree = tree_of(dtype)
    scaled = jax.jit(loss_scale.scale)(tree)
    for name in ("w", "b"):
        assert scaled[name].dtype == dtype
        np.testing.assert_array_equal(np.asarray(scaled[name], np.float32),
                                      np.asarray(tree[name], np.float32) * 2.0 ** 8)
    np.testing.assert_array_equal(scaled["step"], tree["step"])  # integer leaves untouched
    back = jax.jit(loss_scale.unscale)(scaled)
    for name in tree:
        assert back[name].dtype == tree[name].dtype
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(tree[name]))


def test_unscale_float16_with_scale_beyond_float16_range():
    loss_scale = StaticLossScale(2.0 ** 17)  # not representable in float16 (max 65504)
    grads = jnp.array([1024.0, -2.0 ** 12], jnp.float16)
    out = loss_scale.unscale(grads)
    assert out.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(out, np.float32), [2.0 ** -7, -2.0 ** -5])


def test_scaling_recovers_float16_gradients_that_underflow():
    # Compute in float16, params in float32: d/dw (w*c)^2 = 2e-8 underflows in float16.
    c = 1e-4

    def loss_fn(w):
        return jnp.sum((w.astype(jnp.float16) * jnp.float16(c)) ** 2)

    w = jnp.ones(4, jnp.float32)
    assert not np.any(jax.grad(loss_fn)(w))
    loss_scale = DynamicLossScale()
    grads = loss_scale.unscale(jax.grad(lambda p: loss_scale.scale(loss_fn(p)))(w))
    np.testing.assert_allclose(grads, np.full(4, 2 * c * c), rtol=1e-2)


def test_noop_loss_scale_is_identity_without_leaves():
    loss_scale = NoOpLossScale()
    tree = tree_of(jnp.bfloat16)
    assert loss_scale.scale(tree) is tree and loss_scale.unscale(tree) is tree
    assert loss_scale.adjust(jnp.array(False)) is loss_scale
    assert jax.tree.leaves(loss_scale) == []
    assert float(loss_scale.loss_scale) == 1.0


def test_static_loss_scale_never_changes():
    loss_scale = StaticLossScale(128.0)
    for finite in [False, True, False]:
        loss_scale = loss_scale.adjust(jnp.array(finite))
    assert float(loss_scale.loss_scale) == 128.0


def reference_dynamic(scale, finite_flags, period, factor, min_scale):
    """The rule in plain python: shrink on overflow, grow after `period` finite steps."""
    counter, out = 0, []
    for finite in finite_flags:
        if not finite:
            scale, counter = max(scale / factor, min_scale), 0
        elif counter + 1 >= period:
            scale, counter = scale * factor, 0
        else:
            counter += 1
        out.append((scale, counter))
    return out


def test_dynamic_adjust_sequence():
    flags = [True, True, True, False, True, False, False, False, False, True, True, True, True]
    loss_scale = DynamicLossScale(scale=8.0, period=3, factor=2.0, min_scale=2.0)
    adjust = jax.jit(lambda ls, finite: ls.adjust(finite))
    got = []
    for finite in flags:
        loss_scale = adjust(loss_scale, jnp.array(finite))
        got.append((float(loss_scale.loss_scale), int(loss_scale.counter)))
    assert got == reference_dynamic(8.0, flags, period=3, factor=2.0, min_scale=2.0)
    # Spelled out: growth after 3 finite steps, halving on overflow, clamp at min_scale.
    assert got[2] == (16.0, 0) and got[3] == (8.0, 0) and got[8] == (2.0, 0)


def test_dynamic_default_settings_and_factor():
    loss_scale = DynamicLossScale()
    assert float(loss_scale.loss_scale) == 2.0 ** 15
    assert (loss_scale.period, loss_scale.factor, loss_scale.min_scale) == (2000, 2.0, 1.0)
    loss_scale = DynamicLossScale(scale=81.0, period=1, factor=3.0)
    assert float(loss_scale.adjust(True).loss_scale) == 243.0
    assert float(loss_scale.adjust(False).loss_scale) == 27.0


def test_dynamic_growth_stops_before_float32_overflow():
    loss_scale = DynamicLossScale(scale=2.0 ** 127, period=1)
    grown = loss_scale.adjust(True)
    assert float(grown.loss_scale) == 2.0 ** 127 and np.isfinite(float(grown.loss_scale))


def test_dynamic_scale_in_a_jitted_training_loop():
    # float16 overflows whenever the scale is >= 2**10: the scale then oscillates below it.
    def step(loss_scale, x):
        grads = loss_scale.scale(jnp.array([x], jnp.float16))
        finite = all_finite(grads)
        return loss_scale.adjust(finite), finite

    x = 64.0  # 64 * 2**10 = 65536 > 65504 overflows float16
    loss_scale = DynamicLossScale(scale=2.0 ** 12, period=2)
    step = jax.jit(step)
    history = []
    for _ in range(6):
        loss_scale, finite = step(loss_scale, x)
        history.append((float(loss_scale.loss_scale), bool(finite)))
    assert history == [(2.0 ** 11, False), (2.0 ** 10, False), (2.0 ** 9, False),
                       (2.0 ** 9, True), (2.0 ** 10, True), (2.0 ** 9, False)]


def test_loss_scales_are_pytrees():
    loss_scale = DynamicLossScale(scale=4.0, period=5).adjust(True)
    leaves = jax.tree.leaves(loss_scale)
    assert [leaf.dtype for leaf in leaves] == [jnp.float32, jnp.int32]
    paths = [jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(loss_scale)[0]]
    assert paths == [".loss_scale", ".counter"]
    doubled = jax.tree.map(lambda x: x * 2, loss_scale)
    assert type(doubled) is DynamicLossScale and doubled.period == 5
    assert float(doubled.loss_scale) == 8.0 and int(doubled.counter) == 2
    through_jit = jax.jit(lambda ls: ls)(loss_scale)
    assert type(through_jit) is DynamicLossScale
    assert float(through_jit.loss_scale) == 4.0 and int(through_jit.counter) == 1
    assert jax.tree.structure(StaticLossScale(2.0)).num_leaves == 1
    with pytest.raises(AttributeError, match="immutable"):
        loss_scale.loss_scale = jnp.float32(1.0)


def test_all_finite():
    tree = tree_of(jnp.float16)
    assert all_finite(tree).shape == () and bool(all_finite(tree))
    assert bool(all_finite({})) and bool(all_finite({"step": jnp.arange(3)}))
    checker = jax.jit(all_finite)
    for dtype in FLOAT_DTYPES:
        for bad in (jnp.inf, -jnp.inf, jnp.nan):
            broken = dict(tree_of(dtype), b=tree_of(dtype)["b"].at[2].set(bad))
            assert not bool(all_finite(broken)) and not bool(checker(broken))


def test_select_tree_skips_a_step():
    old = {"w": jnp.zeros(3), "opt": (jnp.int32(4),)}
    new = {"w": jnp.ones(3), "opt": (jnp.int32(5),)}
    select = jax.jit(select_tree)
    np.testing.assert_array_equal(select(jnp.array(True), new, old)["w"], new["w"])
    kept = select(jnp.array(False), new, old)
    np.testing.assert_array_equal(kept["w"], old["w"])
    assert int(kept["opt"][0]) == 4


def test_exported_from_optim():
    assert optim.DynamicLossScale is DynamicLossScale and optim.all_finite is all_finite


@pytest.mark.parametrize("make, message", [
    (lambda: StaticLossScale(0.0), "scale .* 0.0"),
    (lambda: StaticLossScale(-2.0), "scale"),
    (lambda: StaticLossScale(float("inf")), "scale"),
    (lambda: DynamicLossScale(period=0), "period .* 0"),
    (lambda: DynamicLossScale(period=2.5), "period"),
    (lambda: DynamicLossScale(factor=1.0), "factor .* 1.0"),
    (lambda: DynamicLossScale(min_scale=0.0), "min_scale"),
    (lambda: DynamicLossScale(scale=0.5, min_scale=1.0), "scale .* 0.5"),
])
def test_invalid_settings_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()
