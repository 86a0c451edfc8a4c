"""Every optimizer in the registry: built by name, and with its learning rate injected."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from tests.oracle import random_tree

SHAPES = {"bias": (5,), "dense": (6, 5), "scale": ()}


def static_args(name, *injected):
    """Every argument of optimizer `name` except `injected`."""
    return [arg for arg in inspect.signature(getattr(optim, name)).parameters
            if arg not in injected]


def test_available_names_build_and_unknown_names_fail():
    assert set(optim.available()) >= {"sgd", "adagrad", "rmsprop", "adam", "adamw", "lion",
                                      "adafactor", "shampoo", "soap", "muon"}
    with pytest.raises(ValueError, match="'adamax'"):
        optim.create("adamax", learning_rate=1e-3)
    with pytest.raises(ValueError, match="momentum"):
        optim.create("adam", learning_rate=1e-3, momentum=0.9)


@pytest.mark.parametrize("name", optim.available())
def test_injected_learning_rate_gives_the_same_updates(name):
    """`optax.inject_hyperparams(factory)(learning_rate=lr)` (lr then lives in the state as
    an array, e.g. for a sweep without recompiling) matches the plain optimizer, under jit."""
    params = random_tree(jax.random.key(0), SHAPES)
    plain = optim.create(name, learning_rate=0.01)
    # Only the learning rate is injected: Shampoo's block_size, Muon's ns_steps, b2 == 1
    # (plain sums) and dtypes shape the computation, so they must stay static.
    injected = optax.inject_hyperparams(getattr(optim, name),
                                        static_args=static_args(name, "learning_rate"))(
        learning_rate=0.01)
    states = [plain.init(params), injected.init(params)]
    updates = [jax.jit(plain.update), jax.jit(injected.update)]
    for step in range(3):
        grads = random_tree(jax.random.key(step + 1), SHAPES)
        outs = []
        for i in range(2):
            out, states[i] = updates[i](grads, states[i], params)
            outs.append(out)
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert states[1].hyperparams["learning_rate"].dtype == jnp.float32


@pytest.mark.parametrize("name, arg", [("shampoo", "statistics_dtype"), ("muon", "ns_dtype")])
def test_injecting_a_dtype_says_to_keep_it_static(name, arg):
    tx = optax.inject_hyperparams(getattr(optim, name),
                                  static_args=static_args(name, "learning_rate", arg))(
        learning_rate=0.01)
    with pytest.raises(ValueError, match=rf"{arg} must be a dtype.*static_args=\('{arg}',\)"):
        tx.init({"w": jnp.ones((4, 3))})
