"""Every optimizer in the registry: built by name, and with its learning rate injected."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ravine import optim
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


# (Muon's ns_dtype may be injected: optax's muon takes it as an array; tests/test_muon.py)
@pytest.mark.parametrize("name, arg", [("shampoo", "statistics_dtype")])
def test_injecting_a_dtype_says_to_keep_it_static(name, arg):
    tx = optax.inject_hyperparams(getattr(optim, name),
                                  static_args=static_args(name, "learning_rate", arg))(
        learning_rate=0.01)
    with pytest.raises(ValueError, match=rf"{arg} must be a dtype.*static_args=\('{arg}',\)"):
        tx.init({"w": jnp.ones((4, 3))})


def _my_signsgd(learning_rate, momentum=0.5):
    """A user's optimizer, defined here: sign of heavy-ball momentum, times -lr."""
    return optax.chain(optax.trace(momentum), optax.scale_by_sign(),
                       optax.scale_by_learning_rate(learning_rate))


@pytest.fixture
def registered_signsgd():
    optim.register("my_signsgd", _my_signsgd)
    yield "my_signsgd"
    optim.unregister("my_signsgd")


def test_a_registered_optimizer_is_built_listed_and_found_like_the_built_in_ones(
        registered_signsgd):
    name = registered_signsgd
    assert optim.available()[-1] == name
    assert optim.factory(name) is _my_signsgd and getattr(optim, name) is _my_signsgd
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.5, -0.5])}
    tx = optim.create(name, learning_rate=0.1, momentum=0.9)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1, 0.1])
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'nesterov'"):
        optim.create(name, learning_rate=0.1, nesterov=True)
    # The race sweeps learning rates with inject_hyperparams: the factory takes a traced lr.
    injected = optax.inject_hyperparams(_my_signsgd)(learning_rate=0.1)
    updates, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1, 0.1])


def test_register_refuses_bad_and_taken_names(registered_signsgd):
    with pytest.raises(ValueError, match="'adamw' is already taken"):
        optim.register("adamw", _my_signsgd)
    with pytest.raises(ValueError, match="'my_signsgd' is already taken"):
        optim.register(registered_signsgd, _my_signsgd)
    with pytest.raises(ValueError, match="identifier.*'my opt'"):
        optim.register("my opt", _my_signsgd)
    with pytest.raises(ValueError, match="callable"):
        optim.register("my_opt", 3)
    with pytest.raises(ValueError, match="learning_rate"):
        optim.register("my_opt", lambda lr: optax.sgd(lr))
    with pytest.raises(ValueError, match="'sgd' was not added by register"):
        optim.unregister("sgd")
    assert "my_opt" not in optim.available()
    with pytest.raises(AttributeError, match="my_opt"):
        getattr(optim, "my_opt")


@pytest.mark.parametrize("name", ["radam", "adamw_8bit", "sophia", "schedule_free_adamw"])
def test_state_follows_the_param_shardings(name):
    """Every state leaf shaped like a param takes its sharding, through a jitted update."""
    from ravine import sharding
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = sharding.make_mesh("data=2,tensor=4")
    param_sh = {"w": NamedSharding(mesh, P("data", "tensor")), "b": NamedSharding(mesh, P())}
    params = jax.device_put({"w": jnp.ones((64, 128)), "b": jnp.ones((128,))}, param_sh)
    hparams = {"min_8bit_size": 1024, "block_size": 256} if name == "adamw_8bit" else {}
    tx = optim.create(name, learning_rate=1e-3, **hparams)
    state_sh = sharding.optimizer_state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    _, state = jax.jit(tx.update, out_shardings=(param_sh, state_sh))(params, state, params)
    shaped_like_w = [leaf for leaf in jax.tree.leaves(state) if leaf.shape == (64, 128)]
    assert len(shaped_like_w) >= 2  # two moments (or moment + z)
    for leaf in shaped_like_w:
        assert leaf.sharding.spec == P("data", "tensor"), (name, leaf.sharding)
