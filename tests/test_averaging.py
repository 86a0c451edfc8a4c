"""Weight averaging against numpy closed forms, dtypes, gating, and shardings under jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ravine import optim
from ravine.optim import averaging
from tests.oracle import random_tree


def iterates(n, dtype=jnp.float32, seed=0):
    return [random_tree(key, dtype=dtype) for key in jax.random.split(jax.random.key(seed), n)]


def as_numpy(tree):
    return {name: np.asarray(leaf, np.float64) for name, leaf in tree.items()}


def test_ema_of_a_sequence_matches_closed_form():
    decay, seq = 0.9, iterates(12)
    ema = averaging.init_average(seq[0])
    step = jax.jit(averaging.ema_params)
    for params in seq[1:]:
        ema = step(ema, params, decay)
    # ema_k = decay^k p_0 + (1 - decay) sum_{j=1..k} decay^(k-j) p_j
    k = len(seq) - 1
    numpy_seq = [as_numpy(p) for p in seq]
    for name in ema:
        expected = decay ** k * numpy_seq[0][name] + (1 - decay) * sum(
            decay ** (k - j) * numpy_seq[j][name] for j in range(1, k + 1))
        np.testing.assert_allclose(ema[name], expected, rtol=1e-5, atol=1e-6)


def test_ema_decay_extremes_and_traced_decay():
    old, new = iterates(2)
    for name, leaf in averaging.ema_params(old, new, 1.0).items():
        np.testing.assert_array_equal(leaf, old[name])
    for name, leaf in averaging.ema_params(old, new, 0.0).items():
        np.testing.assert_array_equal(leaf, new[name])
    traced = jax.jit(averaging.ema_params)(old, new, jnp.float32(0.75))
    for name, leaf in traced.items():
        np.testing.assert_allclose(leaf, 0.75 * old[name] + 0.25 * new[name], rtol=1e-6)


def test_tail_average_is_the_uniform_mean():
    seq = iterates(9)
    avg = averaging.init_average(seq[0])
    step = jax.jit(averaging.tail_average)
    for count, params in enumerate(seq):  # count 0 replaces whatever avg holds
        avg = step(avg, params, count)
    numpy_seq = [as_numpy(p) for p in seq]
    for name in avg:
        expected = np.mean([p[name] for p in numpy_seq], axis=0)
        np.testing.assert_allclose(avg[name], expected, rtol=1e-5, atol=1e-6)


def test_update_tail_average_only_while_active():
    seq = iterates(10)
    active = [False, False, False, True, False, True, True, True, True, True]
    state = averaging.init_tail_average(seq[0])
    step = jax.jit(averaging.update_tail_average)
    for params, on in zip(seq, active):
        state = step(state, params, jnp.array(on))
    assert int(state.count) == sum(active)
    numpy_seq = [as_numpy(p) for p in seq]
    for name in state.average:
        expected = np.mean([p[name] for p, on in zip(numpy_seq, active) if on], axis=0)
        np.testing.assert_allclose(state.average[name], expected, rtol=1e-5, atol=1e-6)
    # Default active=True counts every call.
    always = averaging.update_tail_average(averaging.init_tail_average(seq[0]), seq[1])
    assert int(always.count) == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_averages_are_kept_in_float32(dtype):
    params = {"w": jnp.ones(4, dtype)}
    ema = averaging.init_average(params)
    tail = averaging.init_tail_average(params)
    assert ema["w"].dtype == jnp.float32 and tail.average["w"].dtype == jnp.float32
    # 1 + 2**-7 is exact in bfloat16; an EMA step of 0.001 * 2**-7 is not and would vanish.
    nudged = {"w": jnp.full(4, 1 + 2.0 ** -7, dtype)}
    ema = averaging.ema_params(ema, nudged, 0.999)
    tail = averaging.update_tail_average(tail, nudged)
    assert ema["w"].dtype == jnp.float32 and tail.average["w"].dtype == jnp.float32
    np.testing.assert_allclose(ema["w"], 1 + 0.001 * 2.0 ** -7, rtol=1e-7)
    assert np.all(np.asarray(ema["w"]) > 1.0)


def test_init_average_copies_so_params_can_be_donated():
    params = {"w": jnp.arange(4.0)}
    ema = averaging.init_average(params)
    assert ema["w"] is not params["w"]
    jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
    np.testing.assert_array_equal(ema["w"], np.arange(4.0))


def test_shardings_follow_params_under_jit():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "b": P("model"), "scale": P()}
    shapes = {"w": (8, 6), "b": (6,), "scale": ()}
    params = {name: jax.device_put(jnp.ones(shape, jnp.bfloat16),
                                   NamedSharding(mesh, specs[name]))
              for name, shape in shapes.items()}

    def step(ema, tail, params):
        return (averaging.ema_params(ema, params, 0.99),
                averaging.update_tail_average(tail, params, active=jnp.array(True)))

    ema = jax.jit(averaging.init_average)(params)
    tail = jax.jit(averaging.init_tail_average)(params)
    ema, tail = jax.jit(step)(ema, tail, params)
    for average in (ema, tail.average):
        for name, leaf in average.items():
            assert leaf.sharding.is_equivalent_to(params[name].sharding, leaf.ndim), name


def test_invalid_decay_raises():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="decay .* 1.5"):
        averaging.ema_params(params, params, 1.5)
    with pytest.raises(ValueError, match="decay"):
        averaging.ema_params(params, params, -0.1)


def test_exported_from_optim():
    assert optim.ema_params is averaging.ema_params
    assert optim.init_tail_average is averaging.init_tail_average
