"""Schedule-Free AdamW against optax.contrib.schedule_free_adamw; its eval params."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ravine import optim
from tests.oracle import assert_same_updates, random_tree

LR = 0.01
MASK_TREE = {"scalar": False, "bias": False, "dense": True, "conv": True}


def _optax_with_mask(mask, **kwargs):
    """optax's schedule_free_adamw, with a masked decay (optax's has none): same chain."""
    learning_rate = optax.warmup_constant_schedule(0.0, kwargs["learning_rate"],
                                                   kwargs["warmup_steps"])
    base = optax.chain(
        optax.scale_by_rms(decay=kwargs["b2"], eps=1e-8, eps_in_sqrt=False,
                           bias_correction=True),
        optax.add_decayed_weights(kwargs["weight_decay"], mask),
        optax.scale_by_learning_rate(learning_rate))
    return optax.contrib.schedule_free(base, learning_rate, b1=kwargs["b1"])


@pytest.mark.parametrize("ours, theirs", [
    (lambda: optim.schedule_free_adamw(LR), lambda: optax.contrib.schedule_free_adamw(LR)),
    (lambda: optim.schedule_free_adamw(LR, warmup_steps=20, b1=0.95, b2=0.99, eps=1e-6,
                                       weight_decay=0.1, weight_lr_power=1.0),
     lambda: optax.contrib.schedule_free_adamw(LR, warmup_steps=20, b1=0.95, b2=0.99,
                                               eps=1e-6, weight_decay=0.1,
                                               weight_lr_power=1.0)),
    (lambda: optim.schedule_free_adamw(LR, warmup_steps=10, b1=0.9, b2=0.95,
                                       weight_decay=0.05, mask=MASK_TREE),
     lambda: _optax_with_mask(MASK_TREE, learning_rate=LR, warmup_steps=10, b1=0.9, b2=0.95,
                              weight_decay=0.05)),
    # Independent decay is lr-scaled decay with the coefficient over the (warmed-up) peak.
    (lambda: optim.schedule_free_adamw(LR, warmup_steps=10, weight_decay=0.5,
                                       weight_decay_mode="independent"),
     lambda: optax.contrib.schedule_free_adamw(LR, warmup_steps=10, weight_decay=0.5 / LR)),
], ids=["defaults", "warmup_args", "mask", "independent_decay"])
def test_schedule_free_adamw_equals_optax(ours, theirs):
    assert_same_updates(ours(), theirs(), steps=100)


def test_eval_params_equal_optax_and_are_found_under_wrappers():
    """The averaged x, as optax.contrib.schedule_free_eval_params, also through
    inject_hyperparams and a clipping chain (as the train job wraps optimizers)."""
    params = random_tree(jax.random.key(0))
    ours = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(
        optim.schedule_free_adamw, static_args=("warmup_steps", "mask"))(
            learning_rate=LR, warmup_steps=5))
    theirs = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.contrib.schedule_free_adamw(LR, warmup_steps=5))
    ours_params, theirs_params = params, params
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    for key in jax.random.split(jax.random.key(1), 20):
        grads = random_tree(key)
        updates, ours_state = jax.jit(ours.update)(grads, ours_state, ours_params)
        ours_params = optax.apply_updates(ours_params, updates)
        updates, theirs_state = jax.jit(theirs.update)(grads, theirs_state, theirs_params)
        theirs_params = optax.apply_updates(theirs_params, updates)
    x_ours = optim.schedule_free_eval_params(ours_state, ours_params)
    x_theirs = optax.contrib.schedule_free_eval_params(theirs_state[1], theirs_params)
    for name in params:
        # x = (y - (1 - b1) z) / b1 of O(1) leaves, one jitted and one not: a few ulps of 1.
        np.testing.assert_allclose(x_ours[name], x_theirs[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(x_ours[name], ours_params[name])  # x is not y
    with pytest.raises(ValueError, match="ScheduleFreeState"):
        optim.schedule_free_eval_params(optim.adamw(LR).init(params), params)


def test_converges_at_x_on_a_quadratic_with_a_constant_lr():
    """With a constant lr, the average x gets closer to the minimum than the iterate y."""
    target = jnp.arange(1.0, 6.0)
    loss = lambda p: jnp.sum(jnp.square(p - target))  # noqa: E731
    tx = optim.schedule_free_adamw(0.5, warmup_steps=10)
    params = jnp.zeros(5)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(300):
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert loss(optim.schedule_free_eval_params(state, params)) < 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(b1=0.0), "b1"), (dict(b1=1.0), "b1"), (dict(b2=1.5), "b2"), (dict(eps=-1.0), "eps"),
    (dict(warmup_steps=0), "warmup_steps"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(weight_lr_power=-2.0), "weight_lr_power"), (dict(learning_rate=-0.1), "learning_rate")])
def test_bad_hyperparameters_name_the_value(kwargs, match):
    kwargs = {"learning_rate": LR, **kwargs}
    with pytest.raises(ValueError, match=match):
        optim.schedule_free_adamw(**kwargs)


@pytest.mark.parametrize("params_dtype, state_dtype", [
    ("bfloat16", "float32"), ("float32", "bfloat16"), ("bfloat16", None)])
def test_state_dtype_stores_z_in_it_as_optax(params_dtype, state_dtype):
    """optax's `state_dtype`: z (the sequence the base optimizer steps) is kept in that
    dtype, e.g. float32 for bfloat16 params; updates stay in the params' dtype and equal
    optax.contrib.schedule_free_adamw's (to the bit: the same operations)."""
    params = {name: leaf.astype(params_dtype)
              for name, leaf in random_tree(jax.random.key(0), {"w": (6, 4), "b": (4,)}).items()}
    kwargs = dict(learning_rate=LR, warmup_steps=5, weight_decay=0.1, state_dtype=state_dtype)
    ours, theirs = optim.schedule_free_adamw(**kwargs), optax.contrib.schedule_free_adamw(**kwargs)
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    expected = jnp.dtype(state_dtype or params_dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(ours_state.z)} == {expected}
    ours_update, theirs_update = jax.jit(ours.update), jax.jit(theirs.update)
    ours_params, theirs_params = params, params
    for key in jax.random.split(jax.random.key(1), 10):
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape, p.dtype), params)
        u, ours_state = ours_update(grads, ours_state, ours_params)
        v, theirs_state = theirs_update(grads, theirs_state, theirs_params)
        assert {leaf.dtype for leaf in jax.tree.leaves(u)} == {jnp.dtype(params_dtype)}
        ours_params = optax.apply_updates(ours_params, u)
        theirs_params = optax.apply_updates(theirs_params, v)
    assert {leaf.dtype for leaf in jax.tree.leaves(ours_state.z)} == {expected}
    for name in params:
        np.testing.assert_array_equal(np.asarray(ours_state.z[name], np.float32),
                                      np.asarray(theirs_state.z[name], np.float32))
        np.testing.assert_array_equal(np.asarray(ours_params[name], np.float32),
                                      np.asarray(theirs_params[name], np.float32))


def test_state_dtype_of_the_wrapper_and_its_errors():
    params = jnp.zeros(3, jnp.bfloat16)
    tx = optim.schedule_free(optim.sgd(0.1), learning_rate=0.1, state_dtype=jnp.float32)
    assert tx.init(params).z.dtype == jnp.float32
    with pytest.raises(ValueError, match="state_dtype must be a floating or complex dtype"):
        optim.schedule_free_adamw(LR, state_dtype=jnp.int32)
