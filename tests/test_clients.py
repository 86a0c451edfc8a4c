"""Clients nobody on the project wrote: Flax NNX's `nnx.Optimizer`, linen params boxed by
`nn.with_logical_partitioning`, optax's wrappers, optax's state utilities, and the README's
snippets showing them.

Oracles: the loss of a fixed regression (it must fall), the same run continued without a
split / merge / orbax round trip (identical next step), the same optimizer on unboxed params
(identical updates), the plain optimizer (what `inject_hyperparams` must reproduce), and
optax's own Lion (its state's count)."""
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ravine import models, optim

NAMES = optim.available()


def _hessian_diag(grads, batch_size):
    """A Gauss-Newton-like diagonal for Sophia: batch size times the squared gradient."""
    return {"hessian_diag": jax.tree.map(lambda g: batch_size * g * g, grads)}


# Extra `update` arguments of the optimizers that need them (`spec(name).update_args`).
EXTRA_UPDATE_ARGS = {"sophia": _hessian_diag}


def _extra_args(name, grads, batch_size):
    extra = EXTRA_UPDATE_ARGS.get(name)
    return {} if extra is None else extra(grads, batch_size)


def test_every_optimizer_with_extra_update_args_is_fed_here():
    needs = {name for name in NAMES if optim.spec(name).update_args is not None}
    assert needs <= set(EXTRA_UPDATE_ARGS), needs - set(EXTRA_UPDATE_ARGS)


# ------------------------------------------------------------------------------ Flax NNX

class _Net(nnx.Module):
    """64 -> 64 -> 1: the hidden kernel has 4096 entries, so 8-bit states quantize it
    (`min_8bit_size=4096`), and it is a matrix for Shampoo, SOAP and Muon."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, 64, rngs=rngs)
        self.out = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _regression():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (64, 64))
    return x, jnp.tanh(x @ jax.random.normal(kw, (64, 1)) / 8)


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _nnx_step(name):
    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads, **_extra_args(name, grads, x.shape[0]))
        return loss

    return step


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_trains_and_its_state_survives_split_merge_and_orbax(name, tmp_path):
    """20 steps at lr 1e-2 through `nnx.Optimizer(model, tx, wrt=nnx.Param)` at least halve
    the loss; after `nnx.split` / `nnx.merge`, and after an orbax save and a restore into a
    freshly built model and optimizer, the next step is the one the original run takes."""
    tx = optim.create(name, learning_rate=1e-2)

    def build():
        model = _Net(nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    # Arrays committed to one device from the start, as orbax restores them: one compiled
    # step serves the run, the merged copy and the restored one.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    graphdef, state = nnx.split(build())
    model, optimizer = nnx.merge(graphdef, jax.device_put(state, device))
    step = _nnx_step(name)
    x, y = jax.device_put(_regression(), device)
    losses = [float(step(model, optimizer, x, y)) for _ in range(20)]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.5 * losses[0], losses

    graphdef, state = nnx.split((model, optimizer))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()

    merged_model, merged_optimizer = nnx.merge(graphdef, state, copy=True)  # own variables
    next_loss = float(step(model, optimizer, x, y))
    assert float(step(merged_model, merged_optimizer, x, y)) == next_loss
    for a, b in zip(_params(model), _params(merged_model), strict=True):
        np.testing.assert_array_equal(a, b)

    fresh_graphdef, abstract = nnx.split(nnx.eval_shape(build))
    restored = checkpointer.restore(tmp_path / "state", abstract)
    restored_model, restored_optimizer = nnx.merge(fresh_graphdef, restored)
    assert int(restored_optimizer.step[...]) == 20
    assert float(step(restored_model, restored_optimizer, x, y)) == next_loss
    for a, b in zip(_params(model), _params(restored_model), strict=True):
        np.testing.assert_array_equal(a, b)
    original = jax.tree.leaves(nnx.state(optimizer))
    for a, b in zip(original, jax.tree.leaves(nnx.state(restored_optimizer)), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------ boxed linen params

# Short runs that reach the preconditioned steps.
BOXED_HPARAMS = {"shampoo": dict(start_preconditioning_step=1, precondition_every=2),
                 "soap": dict(precondition_every=2)}
BOXED_STEPS = 4


@pytest.fixture(scope="module")
def boxed_problem():
    """A tiny Transformer's params as `model.init` returns them (boxed in `nn.Partitioned` by
    its `nn.with_logical_partitioning`; random values in the init's structure, which
    `jax.eval_shape` gives without compiling the init), and random gradients for 4 steps,
    boxed alike."""
    config = models.TransformerConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2,
                                      max_len=8)
    shapes = jax.eval_shape(models.Transformer(config).init, jax.random.key(1),
                            jnp.zeros((1, 8), jnp.int32))["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    params = treedef.unflatten([jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32)
                                for p in leaves])
    grads = treedef.unflatten([
        jnp.asarray(0.01 * rng.standard_normal((BOXED_STEPS,) + p.shape), jnp.float32)
        for p in leaves])
    return params, grads


def test_transformer_params_come_boxed(boxed_problem):
    """The premise: every leaf is boxed, the 3-D attention kernels too."""
    params, grads = boxed_problem
    for tree in (params, grads):
        boxes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)
    names = {b.names for b in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
    assert ("heads", "kv", "embed") in names  # the attention output kernel, 3-D


@pytest.mark.parametrize("name", NAMES)
def test_boxed_and_unboxed_params_get_the_same_updates(name, boxed_problem):
    """4 steps (a `lax.scan`, so a boxed state must keep its structure through `update`) on
    the boxed params and on `nn.unbox` of them, fed the same gradients: equal updates."""
    params, grads = boxed_problem
    tx = optim.create(name, learning_rate=1e-2, **BOXED_HPARAMS.get(name, {}))

    boxed_def, plain_def = jax.tree.structure(params), jax.tree.structure(nn.unbox(params))
    update_trees = {}  # each run's treedef of the updates, as traced

    # One function of the flat leaves for both runs, which differ only in the treedef they
    # rebuild: the two traces lower to the same program, compiled once when the compilation
    # cache is on (tests/conftest.py). It returns flat leaves too: a jitted function's output
    # paths are part of its program (`jax.result_info`), and boxed ones would make the two
    # programs differ and compile twice (kron: ~8 s a compile).
    @functools.partial(jax.jit, static_argnums=0)
    def run(treedef, param_leaves, grad_leaves):
        def body(carry, g):
            params, state = carry
            # (Sophia's estimate as for 32 examples a step.)
            updates, state = tx.update(g, state, params, **_extra_args(name, g, 32))
            return (optax.apply_updates(params, updates), state), updates

        params, grads = treedef.unflatten(param_leaves), treedef.unflatten(grad_leaves)
        updates = jax.lax.scan(body, (params, tx.init(params)), grads)[1]
        update_trees[treedef] = jax.tree.structure(updates)
        return jax.tree.leaves(updates)

    leaves = jax.tree.leaves(params), jax.tree.leaves(grads)
    boxed, plain = run(boxed_def, *leaves), run(plain_def, *leaves)
    boxed = update_trees[boxed_def].unflatten(boxed)
    plain = update_trees[plain_def].unflatten(plain)
    # Updates come boxed like the params, or plain like them.
    assert jax.tree.structure(boxed) == boxed_def and jax.tree.structure(plain) == plain_def
    for (path, a), b in zip(jax.tree.leaves_with_path(boxed), jax.tree.leaves(plain),
                            strict=True):
        path = jax.tree_util.keystr(path)
        assert np.any(b != 0), path  # every leaf moves
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=path)


@pytest.mark.parametrize("name", ["shampoo", "soap", "adamw_8bit"])
def test_per_leaf_structures_carry_no_box_but_codes_keep_it(name, boxed_problem):
    """A box's axis names describe arrays laid out like its param: the state's per-leaf
    structures (statistics, bases, block scales) get none, so `nn.get_partition_spec` of the
    state never hands a param's names to a `(*grid, b, b)` statistic; 8-bit codes keep them."""
    params, _ = boxed_problem
    tx = optim.create(name, learning_rate=1e-2, **({"min_8bit_size": 0}
                                                   if name == "adamw_8bit" else {}))
    shapes = jax.eval_shape(tx.init, params)
    param_names = {b.names for b in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree.leaves_with_path(nn.get_partition_spec(shapes), is_leaf=is_spec)
    shaped = dict(jax.tree.leaves_with_path(nn.unbox(shapes)))
    seen_structure = seen_codes = False
    for path, spec in specs:
        keys = jax.tree_util.keystr(path)
        shape = shaped[path].shape
        if any(k in keys for k in ("stats", "roots", "bases", "scales")):
            seen_structure = True
            assert spec == jax.sharding.PartitionSpec(), (keys, spec)
        elif len(spec):
            assert tuple(spec) in param_names and len(spec) == len(shape), (keys, spec)
            seen_codes |= keys.endswith(".codes")
    assert seen_structure
    assert seen_codes == (name == "adamw_8bit")


# -------------------------------------------------------------------------- optax wrappers

STATIC_8BIT = ("block_size", "min_8bit_size")


def test_inject_hyperparams_adamw_8bit_names_its_static_args():
    """Injected, 8-bit AdamW's structural arguments come as traced arrays under jit: the
    error says which to pass in `static_args`; with them static, it is the plain optimizer."""
    params = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.zeros((64,))}
    grads = [jax.tree.map(lambda p, i=i: jnp.cos(p + i), params) for i in range(3)]
    injected = optax.inject_hyperparams(optim.adamw_8bit)(learning_rate=1e-2)
    with pytest.raises(ValueError, match=re.escape(f"static_args={STATIC_8BIT!r}")):
        jax.jit(injected.init)(params)
    state = injected.init(params)  # concrete arrays are read as the numbers they hold
    with pytest.raises(ValueError, match=re.escape(f"static_args={STATIC_8BIT!r}")):
        jax.jit(injected.update)(grads[0], state, params)

    injected = optax.inject_hyperparams(optim.adamw_8bit, static_args=STATIC_8BIT)(
        learning_rate=1e-2)
    plain = optim.adamw_8bit(1e-2)
    states = [jax.jit(injected.init)(params), plain.init(params)]
    assert isinstance(states[0].inner_state[0].mu["w"], optim.quantization.QuantizedArray)
    for g in grads:
        (u0, states[0]), (u1, states[1]) = (jax.jit(tx.update)(g, s, params) for tx, s in
                                            zip((injected, plain), states))
        # rtol: the injected b1, b2, eps are float32 arrays, the plain ones Python floats.
        for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(u1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_lion_state_has_optax_count():
    """`optax.tree.get(state, "count")` finds Lion's step count, as in optax's Lion."""
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    ours, theirs = optim.lion(1e-3), optax.lion(1e-3)
    states = [ours.init(params), theirs.init(params)]
    for state in states:
        assert int(optax.tree.get(state, "count")) == 0
    for i in range(3):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p + i), params)
        states = [tx.update(grads, s, params)[1] for tx, s in zip((ours, theirs), states)]
    assert [int(optax.tree.get(s, "count")) for s in states] == [3, 3]
    assert optax.tree.get(states[0], "count").dtype == jnp.int32


# ----------------------------------------------------------------------------- README

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "## Use with Flax NNX, linen and optax wrappers"


def _section_snippets():
    text = open(README).read()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```py\n(.*?)```", section, re.S)


def test_readme_clients_section_has_three_snippets():
    assert len(_section_snippets()) == 3


@pytest.mark.parametrize("index", range(3))
def test_readme_clients_snippet_runs(index):
    namespace = {}
    code = _section_snippets()[index]
    exec(compile(code, f"README.md clients snippet {index}", "exec"), namespace)
    if index == 0:  # NNX: the model trains
        assert namespace["losses"][-1] < 0.5 * namespace["losses"][0]
    elif index == 1:  # linen: boxed params, the same updates as unboxed ones
        assert isinstance(namespace["params"]["Dense_0"]["kernel"], nn.Partitioned)
        assert namespace["same"]
        specs = jax.tree.leaves(namespace["specs"],
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert {("embed", "mlp"), ("mlp", "embed")} <= {tuple(spec) for spec in specs}
    else:  # optax wrappers: each trained; the non-finite step changed nothing
        start = float(namespace["loss_fn"](namespace["params"]))
        assert set(namespace["final_loss"]) == {"adamw_8bit", "muon", "lion"}
        assert all(loss < start for loss in namespace["final_loss"].values())
        assert namespace["skipped"] == 1
        assert all(np.all(u == 0) for u in jax.tree.leaves(namespace["updates"]))
