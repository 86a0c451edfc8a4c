"""Muon against a port of the reference rule, optax.contrib.muon / optax.adamw, the
spectrum of its update, its routing of a Transformer, and sharding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ravine import models
from ravine import optim
from ravine.optim.muon import (ATTENTION_IN_LAYOUT, ATTENTION_OUT_LAYOUT, FLAX_LAYOUT, TORCH_LAYOUT,
                        MuonDimensionNumbers, hidden_matrices, orthogonalize)
from tests import oracle
from tests.oracle import run_updates

# Tall, wide and square matrices (two of the same shape, stacked together) and non-matrices.
SHAPES = {"tall": (16, 8), "tall_too": (16, 8), "wide": (8, 12), "square": (6, 6),
          "bias": (7,), "scalar": (), "conv": (3, 3, 4, 5)}
NON_MATRICES = {"bias": (7,), "scalar": (), "conv": (3, 3, 4, 5)}


# Random data from numpy (tests.oracle.numpy_tree): jax.random compiles a program for each
# shape it draws (~0.2 s each, a fifth of this file's compiling); these oracles hold for any
# random data.
random_normal, random_tree = oracle.numpy_normal, oracle.numpy_tree
assert_same_updates = functools.partial(oracle.assert_same_updates, numpy_draws=True)


def random_trees(seed, shapes, steps):
    """`steps` random trees, as gradients of consecutive steps."""
    return [random_tree((seed, 1 + t), shapes) for t in range(steps)]


def reference_muon_update(grad, buffer, beta, nesterov=True, ns_steps=5):
    """Jordan's `muon_update` (github.com/KellerJordan/Muon, muon.py) in float64 numpy, for a
    PyTorch weight stored (fan_out, fan_in). Returns the update and the new momentum buffer.

        buffer <- lerp(buffer, grad, 1 - beta);  u = lerp(grad, buffer, beta) (nesterov)
        u <- newton_schulz5(u) * sqrt(max(1, rows / cols))

    The reference iterates in bfloat16 with eps 1e-7; this port keeps the rule, in float64.
    """
    buffer = buffer + (1 - beta) * (grad - buffer)
    update = grad + beta * (buffer - grad) if nesterov else buffer
    x = update.T if update.shape[0] > update.shape[1] else update
    x = x / (np.linalg.norm(x) + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if update.shape[0] > update.shape[1] else x
    return x * max(1.0, update.shape[0] / update.shape[1]) ** 0.5, buffer


@pytest.mark.parametrize("shape", [(12, 12), (8, 20), (20, 8)])
def test_dense_kernel_update_is_the_reference_rule_on_its_transpose(shape):
    # A Flax kernel (fan_in, fan_out) is the transpose of the PyTorch weight the reference
    # rule was written for: (20, 8) is a down-projection, (8, 20) an up-projection.
    lr, beta = 0.02, 0.9
    params = {"kernel": jnp.zeros(shape)}
    grads_seq = [{"kernel": random_normal(t, shape)} for t in range(5)]
    ours = run_updates(optim.muon(lr, momentum=beta), params, grads_seq)
    buffer = np.zeros(shape[::-1])
    for step, (grads, updates) in enumerate(zip(grads_seq, ours)):
        expected, buffer = reference_muon_update(np.asarray(grads["kernel"], np.float64).T,
                                                 buffer, beta)
        np.testing.assert_allclose(updates["kernel"], -lr * expected.T, rtol=2e-4, atol=2e-6,
                                   err_msg=f"step {step}")
    fan_in, fan_out = shape
    singular_values = np.linalg.svd(ours[-1]["kernel"], compute_uv=False)
    target = lr * max(1.0, fan_out / fan_in) ** 0.5  # the up-projection gets the larger step
    assert 0.5 * target < singular_values.max() < 1.3 * target


def test_attention_kernels_update_as_the_reshaped_linear_maps():
    d_model, heads, head_dim = 8, 2, 6
    shapes3 = {"query": (d_model, heads, head_dim), "out": (heads, head_dim, d_model)}
    params = {name: {"kernel": jnp.zeros(shape)} for name, shape in shapes3.items()}
    grads_seq = [{name: {"kernel": random_normal((t, i), shape)}
                  for i, (name, shape) in enumerate(shapes3.items())} for t in range(4)]
    as_matrix = {"query": lambda x: x.reshape(d_model, heads * head_dim),
                 "out": lambda x: x.reshape(heads * head_dim, d_model)}
    flat = lambda tree: {name: {"kernel": as_matrix[name](tree[name]["kernel"])}
                         for name in tree}
    ours = run_updates(optim.muon(0.02), params, grads_seq)  # default routing
    matrices = run_updates(optim.muon(0.02), flat(params), [flat(g) for g in grads_seq])
    for step, (a, b) in enumerate(zip(ours, matrices)):
        for name in shapes3:
            np.testing.assert_allclose(as_matrix[name](a[name]["kernel"]), b[name]["kernel"],
                                       rtol=1e-5, atol=1e-7, err_msg=f"step {step} {name}")


def test_default_routing_of_a_transformer_leaf_by_leaf():
    config = models.TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2,
                                      max_len=8, position="learned")
    # The init's leaves as shape structs (routing reads paths and shapes), without compiling
    # the init, as zeros for the optimizer's init.
    shapes = nn.unbox(jax.eval_shape(models.Transformer(config).init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)))
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    expected = {
        "attn/query/kernel": ATTENTION_IN_LAYOUT, "attn/key/kernel": ATTENTION_IN_LAYOUT,
        "attn/value/kernel": ATTENTION_IN_LAYOUT, "attn/out/kernel": ATTENTION_OUT_LAYOUT,
        "mlp/up/kernel": FLAX_LAYOUT, "mlp/gate/kernel": FLAX_LAYOUT,
        "mlp/down/kernel": FLAX_LAYOUT, "attn_norm/scale": None, "mlp_norm/scale": None,
    }
    expected = {f"params/block_{i}/{path}": dims for i in range(2)
                for path, dims in expected.items()}
    expected.update({"params/embed/embedding": None, "params/position": None,
                     "params/final_norm/scale": None, "params/head/kernel": None})
    routes = hidden_matrices()(params)
    got = {"/".join(str(k.key) for k in path): dims for path, dims in
           jax.tree.leaves_with_path(routes, is_leaf=lambda x: x is None or isinstance(
               x, MuonDimensionNumbers))}
    assert got == expected
    # The optimizer routes the same way: Muon's momentum exists exactly for those leaves.
    state = optim.muon(0.02).init(params)
    momentum = state[0].inner_states["muon"].inner_state.momentum
    muon_leaves = {"/".join(str(k.key) for k in path) for path, _ in
                   jax.tree.leaves_with_path(momentum)}
    assert muon_leaves == {path for path, dims in expected.items() if dims is not None}


def test_torch_layout_is_the_transposed_flax_layout():
    shape = (12, 20)  # a PyTorch (fan_out, fan_in) weight
    grads_seq = [{"w": random_normal(t, shape)} for t in range(3)]
    torch = run_updates(optim.muon(0.02, muon_mask={"w": TORCH_LAYOUT}),
                        {"w": jnp.zeros(shape)}, grads_seq)
    flax = run_updates(optim.muon(0.02), {"w": jnp.zeros(shape[::-1])},
                       [{"w": g["w"].T} for g in grads_seq])
    for a, b in zip(torch, flax):
        np.testing.assert_allclose(a["w"], b["w"].T, rtol=1e-5, atol=1e-7)


def test_matches_optax_contrib_muon_without_nesterov():
    # Same layouts and shape scale as optax (fan_in = reduction axes), 3-D weights
    # included. Without Nesterov, optax's bias-corrected EMA momentum is a positive multiple
    # of our undamped momentum sum, which the Frobenius normalization removes. Its
    # non-matrix leaves get optax.adamw with adam_weight_decay, which we take from
    # weight_decay. A schedule as learning rate: both evaluate it at their own counter.
    # A batch axis too: "stack" is 3 independent (6, 4) maps (axis 0 is neither reduction
    # nor output).
    shapes = {**SHAPES, "attn_out": (2, 4, 8), "stack": (3, 6, 4)}
    routes = {name: (ATTENTION_OUT_LAYOUT if name == "attn_out" else
                     MuonDimensionNumbers(reduction_axis=1, output_axis=2) if name == "stack"
                     else FLAX_LAYOUT if len(shape) == 2 else None)
              for name, shape in shapes.items()}
    schedule = optax.linear_schedule(0.02, 0.002, transition_steps=20)
    hparams = dict(learning_rate=schedule, adam_b1=0.8, adam_b2=0.9, weight_decay=0.1)
    ours = optim.muon(momentum=0.9, nesterov=False, muon_mask=routes, **hparams)
    theirs = optax.contrib.muon(beta=0.9, nesterov=False, adam_weight_decay=0.1,
                                muon_weight_dimension_numbers=routes, **hparams)
    assert_same_updates(ours, theirs, steps=20, shapes=shapes, rtol=1e-4, atol=1e-6)


def test_nesterov_direction_is_orthogonalized_by_the_same_newton_schulz_as_optax():
    # optax's Nesterov mixes bias corrections of different steps, so it is not a multiple
    # of ours; its Newton–Schulz (beta=0) serves as oracle on our momentum recursion
    # m <- beta m + g, d = g + beta m, computed here in numpy.
    lr, beta = 0.05, 0.9
    shapes = {"tall": (16, 8), "wide": (8, 12)}
    params, grads_seq = random_tree(0, shapes), random_trees(1, shapes, 10)
    newton_schulz = optax.contrib.scale_by_muon(
        beta=0.0, nesterov=False,
        weight_dimension_numbers={name: optax.contrib.MuonDimensionNumbers() for name in shapes})
    ns_state = newton_schulz.init(params)
    orthogonalize_like_optax = jax.jit(newton_schulz.update)
    momentum = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    ours = run_updates(optim.muon(lr, momentum=beta, nesterov=True), params, grads_seq)
    for step, (grads, updates) in enumerate(zip(grads_seq, ours)):
        direction = {}
        for name, g in grads.items():
            momentum[name] = beta * momentum[name] + np.asarray(g)
            direction[name] = jnp.asarray(np.asarray(g) + beta * momentum[name])
        orthogonal, _ = orthogonalize_like_optax(direction, ns_state)
        for name, (fan_in, fan_out) in shapes.items():
            expected = -lr * max(1.0, fan_out / fan_in) ** 0.5 * np.asarray(orthogonal[name])
            np.testing.assert_allclose(updates[name], expected, rtol=1e-4, atol=1e-6,
                                       err_msg=f"step {step}, leaf {name}")


def test_non_matrix_leaves_get_adamw_with_adam_learning_rate():
    ours = optim.muon(0.02, adam_learning_rate=3e-3, adam_b1=0.85, adam_b2=0.97,
                      weight_decay=0.05, adam_eps=1e-7)
    theirs = optax.adamw(3e-3, b1=0.85, b2=0.97, eps=1e-7, weight_decay=0.05)
    assert_same_updates(ours, theirs, steps=100, shapes=NON_MATRICES)


def test_muon_mask_routes_a_matrix_to_adamw():
    shapes = {"hidden": (16, 8), "head": (8, 12), "bias": (7,)}
    params, grads_seq = random_tree(0, shapes), random_trees(1, shapes, 3)
    hparams = dict(learning_rate=0.02, adam_learning_rate=1e-3, momentum=0.9)
    tree_mask = {"hidden": True, "head": False, "bias": False}
    by_tree = run_updates(optim.muon(muon_mask=tree_mask, **hparams), params, grads_seq)
    by_name = run_updates(optim.muon(muon_mask=hidden_matrices(exclude="head"), **hparams),
                          params, grads_seq)
    everything = run_updates(optim.muon(muon_mask=hidden_matrices(exclude=()), **hparams),
                             params, grads_seq)
    adamw = run_updates(optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0),
                        params, grads_seq)
    for routed, named, plain, adam in zip(by_tree, by_name, everything, adamw):
        for name in shapes:
            np.testing.assert_array_equal(routed[name], named[name])
        np.testing.assert_allclose(routed["head"], adam["head"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(routed["hidden"], plain["hidden"], rtol=1e-6)
        assert not np.allclose(routed["head"], plain["head"], rtol=0.1)


def test_muon_mask_as_a_prefix_tree_and_as_a_callable():
    shapes = {"hidden": (16, 8), "head": (8, 12)}
    params = {"block": random_tree(0, shapes), "out": jnp.ones((4, 4))}
    grads = [{"block": random_tree(1, shapes), "out": jnp.ones((4, 4))}]
    prefix = run_updates(optim.muon(0.1, muon_mask={"block": True, "out": False}), params, grads)
    call = run_updates(optim.muon(0.1, muon_mask=lambda p: {"block": True, "out": False}),
                       params, grads)
    for name in shapes:
        singular_values = np.linalg.svd(prefix[0]["block"][name], compute_uv=False)
        assert singular_values.min() > 0.5 * 0.1
        np.testing.assert_array_equal(prefix[0]["block"][name], call[0]["block"][name])
    # Adam's first step is -lr * sign(g) (up to eps): the unrouted matrix is on AdamW.
    np.testing.assert_allclose(prefix[0]["out"], -0.1 * np.ones((4, 4)), rtol=1e-6)


def test_a_non_matrix_leaf_on_muon_fails_at_init():
    tx = optim.muon(0.1, muon_mask={"w": True, "b": True})
    with pytest.raises(ValueError, match=r"needs a 2-D leaf, got shape \(3,\) at \['b'\]"):
        tx.init({"w": jnp.ones((3, 3)), "b": jnp.ones((3,))})
    bad_layout = MuonDimensionNumbers(reduction_axis=0, output_axis=(0, 2))
    tx = optim.muon(0.1, muon_mask={"w": bad_layout})
    with pytest.raises(ValueError, match=r"does not fit shape \(3, 4, 5\) at \['w'\]"):
        tx.init({"w": jnp.ones((3, 4, 5))})


def test_complex_params_are_rejected_naming_the_leaf():
    tx = optim.muon(0.1)
    params = {"dense": {"kernel": jnp.ones((4, 3), jnp.complex64)}}
    with pytest.raises(ValueError, match=r"complex params.*\['dense'\]\['kernel'\]"):
        tx.init(params)


def test_bfloat16_newton_schulz_stays_orthogonal_and_keeps_float32_updates():
    shapes = {"tall": (32, 16), "wide": (16, 24)}
    params, grads_seq = random_tree(0, shapes), random_trees(1, shapes, 3)
    exact = run_updates(optim.muon(0.1), params, grads_seq)
    low = run_updates(optim.muon(0.1, ns_dtype=jnp.bfloat16), params, grads_seq)
    for a, b in zip(exact, low):
        for name, (fan_in, fan_out) in shapes.items():
            assert b[name].dtype == jnp.float32
            a_flat, b_flat = np.ravel(a[name]), np.ravel(b[name])
            assert not np.array_equal(a_flat, b_flat)  # bf16 was really used
            # bf16 rounding (2^-8) is amplified by the steep quintic near 0; the direction
            # stays within a few degrees and the spectrum within the same band.
            cosine = a_flat @ b_flat / (np.linalg.norm(a_flat) * np.linalg.norm(b_flat))
            assert cosine > 0.99, cosine
            target = 0.1 * max(1.0, fan_out / fan_in) ** 0.5
            singular_values = np.linalg.svd(b[name], compute_uv=False)
            assert 0.5 * target <= singular_values.min() <= singular_values.max() <= 1.3 * target


def test_orthogonalize_stacks_and_transposes_consistently():
    matrices = random_normal(0, (3, 10, 6))
    ortho = jax.jit(orthogonalize)
    stacked = ortho(matrices)
    for i in range(3):
        np.testing.assert_allclose(stacked[i], ortho(matrices[i]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ortho(matrices[i].T), stacked[i].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ortho(jnp.zeros((4, 5))), np.zeros((4, 5)))


def test_state_keeps_param_shardings_on_a_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"w": P("data", "model"), "v": P(None, "data"), "b": P("model")}
    shapes = {"w": (16, 8), "v": (8, 12), "b": (6,)}  # distinct shapes: find state's param
    shardings = {name: NamedSharding(mesh, spec) for name, spec in specs.items()}
    params = jax.device_put(random_tree(0, shapes), shardings)
    tx = optim.muon(0.02, muon_mask={"w": True, "v": True, "b": False}, weight_decay=0.1)

    def assert_follows_params(state):
        leaves = [leaf for leaf in jax.tree.leaves(state) if jnp.ndim(leaf) > 0]
        by_shape = {shapes[name]: shardings[name] for name in shapes}
        assert sorted(leaf.shape for leaf in leaves) == sorted([(16, 8), (8, 12), (6,), (6,)])
        for leaf in leaves:
            assert leaf.sharding.is_equivalent_to(by_shape[leaf.shape], leaf.ndim), (
                leaf.shape, leaf.sharding)

    state = tx.init(params)
    assert_follows_params(state)
    grads = jax.device_put(random_tree(1, shapes), shardings)
    _, state = jax.jit(tx.update)(grads, state, params)
    assert_follows_params(state)


def test_validation_errors():
    cases = [
        (dict(learning_rate=-1.0), "learning_rate must be a non-negative"),
        (dict(learning_rate=0.1, momentum=1.0), r"momentum must be in \[0.0, 1.0\), got 1.0"),
        (dict(learning_rate=0.1, ns_steps=0), "ns_steps must be a positive integer, got 0"),
        (dict(learning_rate=0.1, weight_decay=-0.1), "weight_decay must be a non-negative"),
        (dict(learning_rate=0.1, adam_learning_rate=-2.0), "adam_learning_rate must be"),
        (dict(learning_rate=0.1, adam_b1=1.5), r"adam_b1 must be in \[0.0, 1.0\)"),
        (dict(learning_rate=0.1, adam_b2=-0.1), r"adam_b2 must be in \[0.0, 1.0\)"),
        (dict(learning_rate=0.1, adam_eps=-1e-8), "adam_eps must be a non-negative"),
        (dict(learning_rate=0.1, ns_dtype=jnp.int32), "ns_dtype must be a floating dtype"),
    ]
    for hparams, message in cases:
        with pytest.raises(ValueError, match=message):
            optim.muon(**hparams)


def test_create_builds_muon_by_name():
    by_name = optim.create("muon", learning_rate=0.02, adam_learning_rate=1e-3, momentum=0.9)
    direct = optim.muon(0.02, adam_learning_rate=1e-3, momentum=0.9)
    assert_same_updates(by_name, direct, steps=3, shapes=SHAPES, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        optim.create("muon", learning_rate=0.02, beta=0.9)


def test_inject_hyperparams_gives_the_same_updates():
    # Every numeric argument (ns_steps included) arrives as a traced array; a dtype must be
    # static (test_registry checks the message saying so).
    shapes = {"dense": (16, 8), "bias": (7,)}
    injected = optax.inject_hyperparams(optim.muon, static_args="ns_dtype")(
        learning_rate=0.02, weight_decay=0.1)
    assert_same_updates(injected, optim.muon(0.02, weight_decay=0.1), steps=3, shapes=shapes,
                        rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_transformer_step():
    """A 64-wide, 2-head Transformer's params as `model.init` returns them (boxed in
    `nn.Partitioned`) and unboxed, with random gradients of the same trees (Muon's
    update depends on nothing else). Shapes from `jax.eval_shape`: nothing compiled."""
    config = models.TransformerConfig(vocab_size=32, d_model=64, n_layers=1, n_heads=2,
                                      max_len=8)
    shapes = jax.eval_shape(models.Transformer(config).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
    leaves, treedef = jax.tree.flatten(shapes)
    random = lambda seed: [random_normal((seed, i), leaf.shape)  # noqa: E731
                           for i, leaf in enumerate(leaves)]
    boxed, boxed_grads = treedef.unflatten(random(0)), treedef.unflatten(random(1))
    return boxed, boxed_grads, nn.unbox(boxed), nn.unbox(boxed_grads)


def test_boxed_params_are_routed_and_updated_as_unboxed_ones(tiny_transformer_step):
    # A boxed leaf's path ends in the box's `.value` attribute: routing must not read it as
    # the attention "value" projection (the module path decides).
    boxed, boxed_grads, params, grads = tiny_transformer_step
    is_route = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
    routes_boxed = jax.tree.leaves(hidden_matrices()(boxed), is_leaf=is_route)
    routes = jax.tree.leaves(hidden_matrices()(params), is_leaf=is_route)
    assert routes_boxed == routes
    tx = optim.muon(1.0, weight_decay=0.1)
    ours_boxed, state_boxed = jax.jit(tx.update)(boxed_grads, tx.init(boxed), boxed)
    ours, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert jax.tree.structure(ours_boxed) == jax.tree.structure(boxed)
    for (path, a), b in zip(jax.tree.leaves_with_path(nn.unbox(ours_boxed)),
                            jax.tree.leaves(ours), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree.leaves(state_boxed), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_boxed_attention_out_kernel_steps_like_the_other_attention_kernels(
        tiny_transformer_step):
    # All four are 64 x 64 linear maps (d_model x heads * head_dim): an orthogonal update
    # has entries of about 1/8 at lr 1. Read as heads x (head_dim * d_model) = 2 x 2048 (the
    # box's ".value" taken for the "value" projection), the out kernel got 0.63.
    boxed, boxed_grads, _, _ = tiny_transformer_step
    tx = optim.muon(1.0)
    updates, _ = jax.jit(tx.update)(boxed_grads, tx.init(boxed), boxed)
    attention = nn.unbox(updates)["params"]["block_0"]["attn"]
    size = {name: float(jnp.abs(attention[name]["kernel"]).mean())
            for name in ("query", "key", "value", "out")}
    for name, mean_abs in size.items():
        assert 0.05 < mean_abs < 0.2, size
    assert max(size.values()) < 1.5 * min(size.values()), size


# 3-D attention kernels, a batch of maps, tall, wide and 1-D leaves.
OPTAX_SHAPES = {"tall": (16, 8), "wide": (8, 12), "attn_out": (2, 4, 8),
                "stack": (3, 6, 4), "bias": (7,)}
OPTAX_ROUTES = {"tall": FLAX_LAYOUT, "wide": FLAX_LAYOUT, "attn_out": ATTENTION_OUT_LAYOUT,
                "stack": MuonDimensionNumbers(reduction_axis=1, output_axis=2), "bias": None}


@pytest.mark.parametrize("options", [
    dict(preconditioning="frobenius"), dict(preconditioning="spectral"),
    dict(preconditioning="aol"), dict(preconditioning="schatten"),
    dict(ns_coeffs="dion"), dict(ns_coeffs="dion", preconditioning="aol"),
    dict(ns_coeffs=((3.0, -3.2, 1.2), (3.4445, -4.7750, 2.0315), (2.0, -1.5, 0.5))),
    dict(ns_coeffs=(2.0, -1.5, 0.5), ns_steps=8, preconditioning="schatten"),
], ids=lambda options: "-".join(f"{k}={v if isinstance(v, str) else '...'}"
                                 for k, v in options.items()))
def test_optax_options_match_optax_contrib_muon(options):
    # Without Nesterov optax's bias-corrected EMA is a positive multiple of our momentum
    # sum, and every preconditioning is blind to the scale (Frobenius and spectral divide
    # by a norm; AOL's and Schatten's first-step factors scale as 1 / |x|).
    hparams = dict(learning_rate=0.02, adam_b1=0.9, adam_b2=0.99, nesterov=False, **options)
    ours = optim.muon(momentum=0.9, muon_mask=OPTAX_ROUTES, **hparams)
    theirs = optax.contrib.muon(beta=0.9, muon_weight_dimension_numbers=OPTAX_ROUTES, **hparams)
    assert_same_updates(ours, theirs, steps=6, shapes=OPTAX_SHAPES, rtol=1e-4, atol=1e-6)


def test_preconditioning_and_coefficients_change_the_update():
    params, grads = random_tree(0, OPTAX_SHAPES), [random_tree(1, OPTAX_SHAPES)]
    runs = {str(options): run_updates(optim.muon(0.02, muon_mask=OPTAX_ROUTES, **options),
                                      params, grads)[0]["tall"]
            for options in (dict(), dict(preconditioning="aol"),
                            dict(preconditioning="schatten"), dict(ns_coeffs="dion"))}
    values = list(runs.values())
    for i in range(len(values)):
        for j in range(i):
            assert not np.allclose(values[i], values[j], rtol=1e-3), list(runs)


@pytest.mark.parametrize("nesterov", [True, False])
def test_adaptive_matches_optax_contrib_muon_without_momentum(nesterov):
    # With momentum 0 both directions are the gradient (optax's bias correction is 1), so
    # the dual-norm scale <g, O(g)> is the same number.
    hparams = dict(learning_rate=0.02, adam_b1=0.9, adam_b2=0.99, nesterov=nesterov,
                   adaptive=True)
    ours = optim.muon(momentum=0.0, muon_mask=OPTAX_ROUTES, **hparams)
    theirs = optax.contrib.muon(beta=0.0, muon_weight_dimension_numbers=OPTAX_ROUTES,
                                **hparams)
    params, grads_seq = random_tree(0, OPTAX_SHAPES), random_trees(1, OPTAX_SHAPES, 4)
    adaptive = run_updates(ours, params, grads_seq)
    # optax hands `nesterov` to its Adam leaves too (ravine's AdamW leaves have none).
    compared = [name for name, dims in OPTAX_ROUTES.items() if dims or not nesterov]
    for step, (a, b) in enumerate(zip(adaptive, run_updates(theirs, params, grads_seq))):
        for name in compared:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6,
                                       err_msg=f"step {step}, leaf {name}")
    plain = run_updates(optim.muon(0.02, momentum=0.0, muon_mask=OPTAX_ROUTES,
                                   nesterov=nesterov), params, grads_seq[:1])
    ratio = np.asarray(adaptive[0]["tall"] / plain[0]["tall"])  # one number: <g, O(g)>
    np.testing.assert_allclose(ratio, ratio.ravel()[0], rtol=1e-4)
    assert not np.isclose(ratio.ravel()[0], 1.0, rtol=0.1)


def test_ns_dtype_injected_as_an_array_is_its_dtype():
    # optax.inject_hyperparams calls a dtype class as a schedule and passes the array it
    # returns (jnp.bfloat16(step)); that array's dtype is the one asked for.
    shapes = {"dense": (16, 8), "bias": (7,)}
    injected = optax.inject_hyperparams(optim.muon, static_args=("ns_steps",))(
        learning_rate=0.02, ns_dtype=jnp.bfloat16)
    state = injected.init(random_tree(0, shapes))
    assert state.hyperparams["ns_dtype"].dtype == jnp.bfloat16
    bf16 = optim.muon(0.02, ns_dtype=jnp.bfloat16)
    assert_same_updates(injected, bf16, steps=3, shapes=shapes, rtol=1e-5, atol=1e-7)
    with pytest.raises(AssertionError):  # bf16 iterations really ran
        assert_same_updates(injected, optim.muon(0.02), steps=1, shapes=shapes)


def test_optax_option_errors_name_the_argument():
    cases = [
        (dict(preconditioning="polar"), r"preconditioning must be one of \['frobenius'"),
        (dict(ns_coeffs="polar"), r"ns_coeffs must be one of \['standard', 'dion'\]"),
        (dict(ns_coeffs=(1.0, 2.0)), r"ns_coeffs must have shape \(3,\) or \(n, 3\)"),
        (dict(ns_coeffs="dion", ns_steps=4), "ns_coeffs has 5 rows .* ns_steps=4"),
        (dict(muon_mask={"w": True}, muon_weight_dimension_numbers={"w": FLAX_LAYOUT}),
         "muon_mask or muon_weight_dimension_numbers"),
    ]
    for hparams, message in cases:
        with pytest.raises(ValueError, match=message):
            optim.muon(0.02, **hparams)
