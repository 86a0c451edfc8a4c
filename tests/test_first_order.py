"""First-order optimizers (optim.transforms, optim.alias) against optax, closed forms and numpy."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ravine import optim
from tests import oracle
from tests.oracle import numpy_tree

LR = 0.01
# Decay the matrix and the kernel, not the scalar and the bias.
MASK_TREE = {"scalar": False, "bias": False, "dense": True, "conv": True}
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.05, warmup_steps=10, decay_steps=100)
# Adafactor factors a leaf when its two largest dims reach min_dim_size_to_factor (128).
LARGE_SHAPES = {"bias": (130,), "narrow": (127, 160), "dense": (128, 160), "stack": (2, 130, 128),
                "tied": (3, 129, 129)}


# This file's programs are tiny and their results are compared with optax's, a closed form or
# each other within a tolerance: XLA's loop emitters compile them about 2x faster than its
# fusion emitters. Measured with them, every gap stays under 0.17 of its tolerance (0.10 with
# the fusion emitters) but two that are as near either way (Adam's complex first step 0.66,
# Adam by hand 0.37); the one case they would fail (weight decay, Muon with a schedule) keeps
# the fusion emitters.
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}


# The steps of both transforms as one scanned program (tests.oracle.scan_updates), on
# numpy-drawn params and gradients.
assert_same_updates = functools.partial(oracle.assert_same_updates, numpy_draws=True,
                                        scanned=True, compiler_options=FAST_COMPILE)
_stack = oracle.stack_trees


def _momentum_wd_chain(momentum, nesterov, weight_decay, mask, learning_rate):
    """optax.sgd with add_decayed_weights inserted before the learning rate (DESIGN.md)."""
    return optax.chain(optax.trace(momentum, nesterov), optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


EQUAL_TO_OPTAX = {
    "sgd": (lambda: optim.sgd(LR), lambda: optax.sgd(LR)),
    "sgd_momentum": (lambda: optim.sgd(LR, momentum=0.9), lambda: optax.sgd(LR, momentum=0.9)),
    "sgd_nesterov_wd_mask_tree": (
        lambda: optim.sgd(LR, momentum=0.8, nesterov=True, weight_decay=0.1, mask=MASK_TREE),
        lambda: _momentum_wd_chain(0.8, True, 0.1, MASK_TREE, LR)),
    "sgd_wd_mask_callable": (
        lambda: optim.sgd(LR, momentum=0.9, weight_decay=0.05, mask=optim.decay_mask),
        lambda: _momentum_wd_chain(0.9, False, 0.05, optim.decay_mask, LR)),
    "adagrad": (lambda: optim.adagrad(LR), lambda: optax.adagrad(LR)),
    "adagrad_args": (lambda: optim.adagrad(LR, initial_accumulator_value=0.5, eps=1e-4),
                     lambda: optax.adagrad(LR, initial_accumulator_value=0.5, eps=1e-4)),
    "rmsprop": (lambda: optim.rmsprop(LR), lambda: optax.rmsprop(LR)),
    "rmsprop_nesterov": (
        lambda: optim.rmsprop(LR, decay=0.95, eps=1e-6, momentum=0.9, nesterov=True),
        lambda: optax.rmsprop(LR, decay=0.95, eps=1e-6, momentum=0.9, nesterov=True)),
    "adam": (lambda: optim.adam(LR), lambda: optax.adam(LR)),
    "adam_args": (lambda: optim.adam(LR, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8),
                  lambda: optax.adam(LR, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8)),
    "adamw": (lambda: optim.adamw(LR), lambda: optax.adamw(LR)),
    "adamw_mask_tree": (lambda: optim.adamw(LR, b1=0.5, weight_decay=0.1, mask=MASK_TREE),
                        lambda: optax.adamw(LR, b1=0.5, weight_decay=0.1, mask=MASK_TREE)),
    "adamw_mask_callable": (
        lambda: optim.adamw(LR, b2=0.9, eps=1e-5, weight_decay=0.1, mask=optim.decay_mask),
        lambda: optax.adamw(LR, b2=0.9, eps=1e-5, weight_decay=0.1, mask=optim.decay_mask)),
    "lion": (lambda: optim.lion(LR), lambda: optax.lion(LR)),
    "lion_args": (lambda: optim.lion(LR, b1=0.5, b2=0.9, weight_decay=0.1, mask=optim.decay_mask),
                  lambda: optax.lion(LR, b1=0.5, b2=0.9, weight_decay=0.1, mask=optim.decay_mask)),
    "lion_no_decay": (lambda: optim.lion(LR, weight_decay=0.0),
                      lambda: optax.lion(LR, weight_decay=0.0)),
    "adafactor": (lambda: optim.adafactor(LR), lambda: optax.adafactor(LR)),
    "adafactor_factored_small": (lambda: optim.adafactor(LR, min_dim_size_to_factor=4),
                                 lambda: optax.adafactor(LR, min_dim_size_to_factor=4)),
    "adafactor_args": (
        lambda: optim.adafactor(LR, min_dim_size_to_factor=3, decay_rate=0.6, decay_offset=2,
                                multiply_by_parameter_scale=False, clipping_threshold=None,
                                eps=1e-20, weight_decay=0.5, mask=MASK_TREE),
        lambda: optax.adafactor(LR, min_dim_size_to_factor=3, decay_rate=0.6, decay_offset=2,
                                multiply_by_parameter_scale=False, clipping_threshold=None,
                                eps=1e-20, weight_decay_rate=0.5 * LR,
                                weight_decay_mask=MASK_TREE)),
    # Schedules: momentum after the learning rate (rmsprop) and before it (sgd) must both match.
    "sgd_schedule": (lambda: optim.sgd(SCHEDULE, momentum=0.9, nesterov=True),
                     lambda: optax.sgd(SCHEDULE, momentum=0.9, nesterov=True)),
    "rmsprop_schedule": (lambda: optim.rmsprop(SCHEDULE, momentum=0.9),
                         lambda: optax.rmsprop(SCHEDULE, momentum=0.9)),
    "adamw_schedule": (lambda: optim.adamw(SCHEDULE, weight_decay=0.1),
                       lambda: optax.adamw(SCHEDULE, weight_decay=0.1)),
    "lion_schedule": (lambda: optim.lion(SCHEDULE), lambda: optax.lion(SCHEDULE)),
    "adafactor_schedule": (lambda: optim.adafactor(SCHEDULE), lambda: optax.adafactor(SCHEDULE)),
    # optax.inject_hyperparams hands every numeric hyperparameter over as a (traced) array.
    "inject_adamw": (
        lambda: optax.inject_hyperparams(optim.adamw)(learning_rate=SCHEDULE, b1=0.8,
                                                      weight_decay=0.1, mask=optim.decay_mask),
        lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=SCHEDULE, b1=0.8,
                                                      weight_decay=0.1, mask=optim.decay_mask)),
    "inject_sgd": (
        lambda: optax.inject_hyperparams(optim.sgd)(learning_rate=LR, momentum=0.9),
        lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=LR, momentum=0.9)),
    "inject_lion": (lambda: optax.inject_hyperparams(optim.lion)(learning_rate=SCHEDULE),
                    lambda: optax.inject_hyperparams(optax.lion)(learning_rate=SCHEDULE)),
}


@pytest.mark.parametrize("case", sorted(EQUAL_TO_OPTAX))
def test_equals_optax(case):
    ours, theirs = EQUAL_TO_OPTAX[case]
    assert_same_updates(ours(), theirs())


def test_adafactor_at_defaults_factors_large_leaves_like_optax():
    ours = optim.adafactor(LR)
    params = numpy_tree(0, LARGE_SHAPES)
    # Which leaves are factored follows from their shapes: the state's shapes suffice.
    factored = {name for name, moment in jax.eval_shape(ours.init, params)[0].moments.items()
                if isinstance(moment, optim.transforms.FactoredMoments)}
    assert factored == {"dense", "stack", "tied"}
    assert_same_updates(ours, optax.adafactor(LR), steps=10, shapes=LARGE_SHAPES)


def test_adam_by_hand():
    """theta0 = 2, loss theta^2 / 2, lr 0.1: Adam's first step is lr * sign(g), then numpy."""
    learning_rate, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    tx = optim.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    theta = jnp.asarray(2.0)
    state = tx.init(theta)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(theta, state):
        updates, state = tx.update(jax.grad(lambda t: t**2 / 2)(theta), state, theta)
        return optax.apply_updates(theta, updates), state

    ours = []
    for _ in range(3):
        theta, state = step(theta, state)
        ours.append(float(theta))

    expected, t, m, v = [], 2.0, 0.0, 0.0
    for step in range(1, 4):
        m = b1 * m + (1 - b1) * t
        v = b2 * v + (1 - b2) * t * t
        t -= learning_rate * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + eps)
        expected.append(t)
    assert ours[0] == pytest.approx(2.0 - learning_rate, rel=1e-6)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)  # float32 vs float64
    np.testing.assert_allclose(ours, [1.900, 1.800, 1.701], atol=1e-3)


INVALID = [
    (optim.sgd, dict(learning_rate=-0.1), "learning_rate", "-0.1"),
    (optim.sgd, dict(learning_rate=0.1, momentum=1.0), "momentum", "1.0"),
    (optim.sgd, dict(learning_rate=0.1, weight_decay=-1.0), "weight_decay", "-1.0"),
    (optim.adagrad, dict(learning_rate=0.1, initial_accumulator_value=-1.0),
     "initial_accumulator_value", "-1.0"),
    (optim.adagrad, dict(learning_rate=0.1, eps=-1e-7), "eps", "-1e-07"),
    (optim.rmsprop, dict(learning_rate=0.1, decay=1.0), "decay", "1.0"),
    (optim.rmsprop, dict(learning_rate=0.1, momentum=-0.5), "momentum", "-0.5"),
    (optim.adam, dict(learning_rate=0.1, b1=1.0), "b1", "1.0"),
    (optim.adam, dict(learning_rate=0.1, b2=-0.1), "b2", "-0.1"),
    (optim.adam, dict(learning_rate=0.1, eps=-1.0), "eps", "-1.0"),
    (optim.adam, dict(learning_rate=0.1, eps_root=-1.0), "eps_root", "-1.0"),
    (optim.adamw, dict(learning_rate=float("nan")), "learning_rate", "nan"),
    (optim.adamw, dict(learning_rate=0.1, weight_decay=-1e-4), "weight_decay", "-0.0001"),
    (optim.lion, dict(learning_rate=0.1, b2=1.5), "b2", "1.5"),
    (optim.lion, dict(learning_rate="fast"), "learning_rate", "'fast'"),
    (optim.adafactor, dict(learning_rate=0.1, min_dim_size_to_factor=0),
     "min_dim_size_to_factor", "0"),
    (optim.adafactor, dict(learning_rate=0.1, decay_rate=-0.8), "decay_rate", "-0.8"),
    (optim.adafactor, dict(learning_rate=0.1, clipping_threshold=0.0), "clipping_threshold", "0.0"),
    (optim.scale_by_momentum, dict(decay=1.2), "decay", "1.2"),
]


@pytest.mark.parametrize("factory, kwargs, name, value", INVALID)
def test_invalid_hyperparameter_names_argument_and_value(factory, kwargs, name, value):
    with pytest.raises(ValueError, match=rf"^{name} .*{re.escape(value)}$"):
        factory(**kwargs)


def test_injected_hyperparameters_are_validated_at_init():
    tx = optax.inject_hyperparams(optim.adam)(learning_rate=0.1, b1=1.5)
    with pytest.raises(ValueError, match=r"^b1 .*1\.5$"):
        tx.init({"w": jnp.ones(3)})


# Every optimizer, with state in every piece: momentum on, adafactor factoring small leaves.
ALL = {
    "sgd": lambda: optim.sgd(LR, momentum=0.9, weight_decay=0.1),
    "adagrad": lambda: optim.adagrad(LR),
    "rmsprop": lambda: optim.rmsprop(LR, momentum=0.9),
    "adam": lambda: optim.adam(LR),
    "adamw": lambda: optim.adamw(LR, mask=optim.decay_mask),
    "lion": lambda: optim.lion(LR),
    "adafactor": lambda: optim.adafactor(LR, min_dim_size_to_factor=4),
}


def _array_dtypes(tree):
    return [leaf.dtype for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_keeps_dtype_and_structure_under_jit(name):
    """bf16 params and grads keep bf16 state and updates (as optax), and jit never re-traces."""
    tx = ALL[name]()
    params = numpy_tree(1, dtype=jnp.bfloat16)
    state = tx.init(params)
    initial = (jax.tree.structure(state), _array_dtypes(state))
    traces = []

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # dtypes, no values, checked
    def step(grads, state, params):
        traces.append(None)
        return tx.update(grads, state, params)

    for seed in range(3):
        grads = numpy_tree(seed, dtype=jnp.bfloat16)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert (jax.tree.structure(state), _array_dtypes(state)) == initial
    assert len(traces) == 1
    assert set(_array_dtypes(updates)) == {jnp.dtype(jnp.bfloat16)}
    assert set(_array_dtypes(state)) <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)}


SHARDED_SPECS = {"scalar": P(), "bias": P("model"), "dense": P("data", "model"),
                 "conv": P(None, None, "data", "model")}
SHARDED_SHAPES = {"scalar": (), "bias": (8,), "dense": (16, 8), "conv": (3, 3, 4, 8)}


@pytest.mark.parametrize("name, axis_type", [(name, AxisType.Auto) for name in sorted(ALL)]
                         + [("adamw", AxisType.Explicit), ("adafactor", AxisType.Explicit)])
def test_state_follows_param_shardings(name, axis_type):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):  # Explicit axes need the mesh in context for eager ops
        _check_state_follows_param_shardings(ALL[name](), mesh)


def _check_state_follows_param_shardings(tx, mesh):
    shardings = {k: NamedSharding(mesh, spec) for k, spec in SHARDED_SPECS.items()}
    params = jax.device_put(numpy_tree(3, SHARDED_SHAPES), shardings)

    # The compiler options act after sharding propagation: the same shardings come out.
    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def train_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for seed in range(2):
        grads = jax.device_put(numpy_tree(seed, SHARDED_SHAPES), shardings)
        params, state = train_step(params, state, grads)

    checked = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path((params, state)):
        param_name = getattr(path[-1], "key", None)
        if param_name in shardings and leaf.shape == SHARDED_SHAPES[param_name]:
            assert leaf.sharding.is_equivalent_to(shardings[param_name], leaf.ndim), (
                jax.tree_util.keystr(path), leaf.sharding)
            checked += 1
    assert checked > len(SHARDED_SHAPES)  # params and at least one param-shaped state tree


def _state_bytes(state):
    """Bytes of the state's arrays, leaving out step counters."""
    return sum(leaf.nbytes for path, leaf in jax.tree_util.tree_leaves_with_path(state)
               if getattr(path[-1], "name", None) != "count")


def test_lion_state_is_half_of_adams():
    params = numpy_tree(5)
    adam_bytes = _state_bytes(optim.adamw(LR).init(params))
    assert adam_bytes == 2 * sum(p.nbytes for p in jax.tree.leaves(params))
    assert 2 * _state_bytes(optim.lion(LR).init(params)) == adam_bytes


def test_decay_mask_and_shared_helpers():
    params = numpy_tree(6)
    assert optim.decay_mask(params) == MASK_TREE
    assert optim.decay_mask(jax.eval_shape(lambda: params)) == MASK_TREE

    grads = numpy_tree(7)
    no_decay = optim.add_decoupled_weight_decay(0.0, MASK_TREE)
    updates, _ = no_decay.update(grads, no_decay.init(params), params)
    assert updates is grads
    # The decay and the learning rate each as one program (not op by op), the expected
    # values in numpy.
    decay = optim.add_decoupled_weight_decay(0.5, MASK_TREE)
    updates, _ = jax.jit(decay.update, compiler_options=FAST_COMPILE)(
        grads, decay.init(params), params)
    params, grads = jax.device_get((params, grads))
    for name, decayed in MASK_TREE.items():
        np.testing.assert_allclose(updates[name], grads[name] + decayed * 0.5 * params[name],
                                   rtol=1e-6)

    lr = optim.scale_by_learning_rate(lambda step: 0.1 * (step + 1))
    state, lr_update = lr.init(params), jax.jit(lr.update, compiler_options=FAST_COMPILE)
    for step in range(3):
        updates, state = lr_update(grads, state)
        np.testing.assert_allclose(updates["dense"], -0.1 * (step + 1) * grads["dense"], rtol=1e-6)


def test_registry_builds_every_first_order_optimizer():
    names = optim.available()
    assert set(ALL) <= set(names)
    assert_same_updates(optim.create("adamw", learning_rate=LR, b1=0.8, mask=optim.decay_mask),
                        optax.adamw(LR, b1=0.8, mask=optim.decay_mask), steps=5)
    assert_same_updates(optim.create("sgd", learning_rate=LR, momentum=0.9),
                        optax.sgd(LR, momentum=0.9), steps=5)


def test_registry_rejects_unknown_names_and_hyperparameters():
    with pytest.raises(ValueError, match="unknown optimizer 'adamax'") as info:
        optim.create("adamax", learning_rate=LR)
    for name in optim.available():
        assert name in str(info.value)
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'momentum'.*'adam'"):
        optim.create("adam", learning_rate=LR, momentum=0.9)
    with pytest.raises(ValueError, match=r"^b1 .*2\.0$"):
        optim.create("lion", learning_rate=LR, b1=2.0)


# --- complex parameters, optax's signatures, weight decay modes (issues 13, 15, 19) ---

COMPLEX_SHAPES = {"scalar": (), "bias": (7,), "dense": (6, 5), "conv": (3, 3, 4, 5)}


def _complex_tree(seed, shapes=COMPLEX_SHAPES):
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape),
                              jnp.complex64) for name, shape in shapes.items()}


def _assert_same_complex_updates(ours, theirs, steps=20):
    """Both transforms on the same complex gradients, params moved by ours' updates (the
    steps as one scanned program, as `tests.oracle.scan_updates`)."""
    def step(carry, grads):
        params, our_state, their_state = carry
        updates, our_state = ours.update(grads, our_state, params)
        expected, their_state = theirs.update(grads, their_state, params)
        return (optax.apply_updates(params, updates), our_state, their_state), (updates, expected)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(params, grads):
        return jax.lax.scan(step, (params, ours.init(params), theirs.init(params)), grads)[1]

    updates, expected = jax.device_get(
        run(_complex_tree(100), _stack([_complex_tree(step) for step in range(steps)])))
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
    chex.assert_tree_all_finite(updates)


COMPLEX_EQUAL_TO_OPTAX = {
    "sgd_nesterov_wd": (lambda: optim.sgd(LR, momentum=0.9, nesterov=True, weight_decay=0.1),
                        lambda: _momentum_wd_chain(0.9, True, 0.1, None, LR)),
    "adagrad": (lambda: optim.adagrad(LR), lambda: optax.adagrad(LR)),
    "rmsprop_momentum": (lambda: optim.rmsprop(LR, momentum=0.9),
                         lambda: optax.rmsprop(LR, momentum=0.9)),
    "rmsprop_centered_debiased": (
        lambda: optim.rmsprop(LR, centered=True, bias_correction=True),
        lambda: optax.rmsprop(LR, centered=True, bias_correction=True)),
    "adam": (lambda: optim.adam(LR), lambda: optax.adam(LR)),
    "adam_nesterov": (lambda: optim.adam(LR, nesterov=True), lambda: optax.adam(LR, nesterov=True)),
    "adamw_mask": (lambda: optim.adamw(LR, weight_decay=0.1, mask=MASK_TREE),
                   lambda: optax.adamw(LR, weight_decay=0.1, mask=MASK_TREE)),
    "lion": (lambda: optim.lion(LR), lambda: optax.lion(LR)),
    "adafactor_factored": (lambda: optim.adafactor(LR, min_dim_size_to_factor=4),
                           lambda: optax.adafactor(LR, min_dim_size_to_factor=4)),
    "adafactor_momentum": (lambda: optim.adafactor(LR, momentum=0.9, dtype_momentum="complex64"),
                           lambda: optax.adafactor(LR, momentum=0.9,
                                                   dtype_momentum=jnp.complex64)),
}


@pytest.mark.parametrize("case", sorted(COMPLEX_EQUAL_TO_OPTAX))
def test_complex_params_equal_optax(case):
    ours, theirs = COMPLEX_EQUAL_TO_OPTAX[case]
    _assert_same_complex_updates(ours(), theirs())


def test_adam_first_step_on_complex_gradient_keeps_its_phase():
    """optax's |g|^2: Adam's first step is -lr * g / |g|, not a real ±lr step."""
    g = jnp.asarray([3 + 4j, -1j], jnp.complex64)
    tx = optim.adam(0.1)
    first_step = jax.jit(lambda g: tx.update(g, tx.init(jnp.zeros_like(g)))[0],
                         compiler_options=FAST_COMPILE)  # one program, not op by op
    updates = first_step(g)
    chex.assert_trees_all_close(updates, -0.1 * g / jnp.abs(g), rtol=1e-5)


SIGNATURES_EQUAL_TO_OPTAX = {
    "sgd_accumulator_dtype": (
        lambda: optim.sgd(LR, momentum=0.9, accumulator_dtype=jnp.bfloat16),
        lambda: optax.sgd(LR, momentum=0.9, accumulator_dtype=jnp.bfloat16)),
    "sgd_momentum_zero": (lambda: optim.sgd(LR, momentum=0.0), lambda: optax.sgd(LR, momentum=0.0)),
    "adam_mu_dtype_nesterov": (
        lambda: optim.adam(LR, mu_dtype=jnp.bfloat16, nesterov=True),
        lambda: optax.adam(LR, mu_dtype=jnp.bfloat16, nesterov=True)),
    "adamw_nesterov_eps_root": (
        lambda: optim.adamw(LR, weight_decay=0.1, eps_root=1e-8, nesterov=True),
        lambda: optax.adamw(LR, weight_decay=0.1, eps_root=1e-8, nesterov=True)),
    "rmsprop_centered": (lambda: optim.rmsprop(LR, centered=True, momentum=0.9),
                         lambda: optax.rmsprop(LR, centered=True, momentum=0.9)),
    "rmsprop_pytorch_eps_debiased": (
        lambda: optim.rmsprop(LR, eps_in_sqrt=False, bias_correction=True, initial_scale=0.1),
        lambda: optax.rmsprop(LR, eps_in_sqrt=False, bias_correction=True, initial_scale=0.1)),
    "lion_mu_dtype": (lambda: optim.lion(LR, mu_dtype=jnp.bfloat16),
                      lambda: optax.lion(LR, mu_dtype=jnp.bfloat16)),
    "adafactor_no_learning_rate": (lambda: optim.adafactor(), lambda: optax.adafactor()),
    "adafactor_unfactored": (lambda: optim.adafactor(LR, min_dim_size_to_factor=4, factored=False),
                             lambda: optax.adafactor(LR, min_dim_size_to_factor=4, factored=False)),
    "adafactor_momentum_rate_schedule": (
        lambda: optim.adafactor(SCHEDULE, min_dim_size_to_factor=4, momentum=0.9,
                                weight_decay_rate=1e-3, weight_decay_mask=MASK_TREE),
        lambda: optax.adafactor(SCHEDULE, min_dim_size_to_factor=4, momentum=0.9,
                                weight_decay_rate=1e-3, weight_decay_mask=MASK_TREE)),
    "adafactor_rate_is_a_schedule": (
        lambda: optim.adafactor(LR, weight_decay_rate=SCHEDULE),
        lambda: optax.adafactor(LR, weight_decay_rate=SCHEDULE)),
}


@pytest.mark.parametrize("case", sorted(SIGNATURES_EQUAL_TO_OPTAX))
def test_optax_signatures_equal_optax(case):
    ours, theirs = SIGNATURES_EQUAL_TO_OPTAX[case]
    assert_same_updates(ours(), theirs(), steps=20)


# Every first-order optimizer with weight decay, and the coefficient it takes.
DECAYED = {
    "sgd": lambda lr, **kw: optim.sgd(lr, momentum=0.9, **kw),
    "adamw": lambda lr, **kw: optim.adamw(lr, **kw),
    "lion": lambda lr, **kw: optim.lion(lr, **kw),
    "adafactor": lambda lr, **kw: optim.adafactor(lr, min_dim_size_to_factor=4, **kw),
    # The other optimizers whose decay is the same additive term (SOAP decays after its
    # step, as the official code; Schedule-Free decays inside its averaged iterate).
    "radam": lambda lr, **kw: optim.radam(lr, **kw),
    "adamw_8bit": lambda lr, **kw: optim.adamw_8bit(lr, min_8bit_size=0, block_size=8, **kw),
    "sophia": lambda lr, **kw: optim.sophia(lr, **kw),
    "shampoo": lambda lr, **kw: optim.shampoo(lr, block_size=8, precondition_every=2,
                                              start_preconditioning_step=2, **kw),
    "muon": lambda lr, **kw: optim.muon(lr, **kw),
}
WARMUP_COSINE = optim.schedules.warmup_cosine(0.05, total_steps=12, warmup_steps=3)
DECAY_LEARNING_RATES = {"constant": 0.02, "schedule": WARMUP_COSINE}


@pytest.mark.parametrize("name", sorted(DECAYED))
@pytest.mark.parametrize("mode", ["lr_scaled", "independent"])
@pytest.mark.parametrize("learning_rate", sorted(DECAY_LEARNING_RATES))
def test_weight_decay_modes_add_the_decay_term_by_hand(name, mode, learning_rate):
    """Step with decay = step without decay - c_t * wd * w on decayed leaves, where c_t is
    lr_t ("lr_scaled") or s_t = lr_t / peak ("independent"; 1 for a constant lr)."""
    weight_decay = 0.3
    lr_or_schedule = DECAY_LEARNING_RATES[learning_rate]
    decayed = DECAYED[name](lr_or_schedule, weight_decay=weight_decay, mask=MASK_TREE,
                            weight_decay_mode=mode)
    plain = DECAYED[name](lr_or_schedule, weight_decay=0.0)
    # Both transforms' inits as one program, and their steps as another (a Python loop of 12
    # steps: cheaper to compile than a scan, for a dozen dispatches). Muon with a schedule
    # compiled with the loop emitters rounds differently with and without decay: up to 1.4x
    # the tolerance off (0.02x with the fusion emitters); every other case stays within 0.17x
    # of it with the loop emitters.
    compiler_options = None if (name, learning_rate) == ("muon", "schedule") else FAST_COMPILE

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def init(params):
        return decayed.init(params), plain.init(params)

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(params, decayed_state, plain_state, grads):  # both on the decayed run's params
        updates, decayed_state = decayed.update(grads, decayed_state, params)
        direction, plain_state = plain.update(grads, plain_state, params)
        return optax.apply_updates(params, updates), decayed_state, plain_state, updates, direction

    params = numpy_tree(50)
    decayed_state, plain_state = init(params)
    for step_index in range(12):
        lr = float(lr_or_schedule(step_index)) if callable(lr_or_schedule) else lr_or_schedule
        coefficient = lr if mode == "lr_scaled" else lr / 0.05 if callable(lr_or_schedule) else 1.0
        new_params, decayed_state, plain_state, updates, direction = step(
            params, decayed_state, plain_state, numpy_tree(step_index))
        expected = {key: direction[key] - MASK_TREE[key] * coefficient * weight_decay * params[key]
                    for key in params}
        chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
        params = new_params


def test_independent_decay_by_hand_constant_and_warmup_cosine():
    """SGD: `w <- (1 - λ) w - η g` for a constant η; with warmup_cosine (W=2, T=8) the decay
    follows s_t = lr_t / peak, the schedule's own closed form computed in numpy."""
    lam, eta, peak = 0.1, 0.05, 0.2
    rng = np.random.default_rng(0)
    w0, grads = rng.standard_normal(4), rng.standard_normal((8, 4))

    def run(tx):
        w, state, out = jnp.asarray(w0, jnp.float32), tx.init(jnp.zeros(4)), []
        update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
        for g in grads:
            updates, state = update(jnp.asarray(g, jnp.float32), state, w)
            w = optax.apply_updates(w, updates)
            out.append(np.asarray(w))
        return np.array(out)

    expected, w = [], w0.copy()
    for g in grads:
        w = (1 - lam) * w - eta * g
        expected.append(w)
    np.testing.assert_allclose(run(optim.sgd(eta, weight_decay=lam,
                                             weight_decay_mode="independent")),
                               expected, rtol=1e-5)

    def lr_at(t, warmup=2, total=8, end=0.1 * peak):
        if t < warmup:
            return peak * t / warmup
        return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))

    schedule = optim.schedules.warmup_cosine(peak, total_steps=8, warmup_steps=2)
    independent, lr_scaled, w_ind, w_lr = [], [], w0.copy(), w0.copy()
    for t, g in enumerate(grads):
        w_ind = w_ind - lr_at(t) * g - (lr_at(t) / peak) * lam * w_ind
        w_lr = w_lr - lr_at(t) * (g + lam * w_lr)
        independent.append(w_ind)
        lr_scaled.append(w_lr)
    np.testing.assert_allclose(
        run(optim.sgd(schedule, weight_decay=lam, weight_decay_mode="independent")),
        independent, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run(optim.sgd(schedule, weight_decay=lam)), lr_scaled,
                               rtol=1e-5, atol=1e-7)


def test_adafactor_weight_decay_rate_is_independent_decay_for_a_constant_lr():
    optax_style = optim.adafactor(LR, min_dim_size_to_factor=4, weight_decay_rate=0.2)
    ravine_style = optim.adafactor(LR, min_dim_size_to_factor=4, weight_decay=0.2,
                                   weight_decay_mode="independent")
    assert_same_updates(ravine_style, optax_style, steps=10)
    assert_same_updates(optax_style, optax.adafactor(LR, min_dim_size_to_factor=4,
                                                     weight_decay_rate=0.2), steps=10)


@pytest.mark.parametrize("name, make", [
    ("linear", lambda: optim.schedules.linear(0.3, 20, warmup_steps=4, init_value=0.01)),
    ("warmup_cosine", lambda: optim.schedules.warmup_cosine(0.3, 20, warmup_steps=4)),
    ("wsd", lambda: optim.schedules.wsd(0.3, 20, warmup_steps=4, decay_shape="sqrt")),
    ("cosine_restarts", lambda: optim.schedules.cosine_restarts(0.3, 5, warmup_steps=2)),
    ("inverse_sqrt", lambda: optim.schedules.inverse_sqrt(0.3, 4)),
    ("constant", lambda: optim.schedules.constant(0.3)),
])
def test_schedules_report_their_peak(name, make):
    schedule = make()
    values = np.asarray(schedule(jnp.arange(30)))
    assert schedule.peak_value == 0.3, name
    np.testing.assert_allclose(values.max(), schedule.peak_value, rtol=1e-6)
    assert optim.peak_learning_rate(schedule) == 0.3


def test_weight_decay_mode_errors_say_what_to_do():
    optax_schedule = optax.cosine_decay_schedule(0.1, 100)
    with pytest.raises(ValueError, match=r"^learning_rate: .*peak_value"):
        optim.adamw(optax_schedule, weight_decay_mode="independent")
    optax_schedule.peak_value = 0.1  # declaring the peak by hand is enough
    assert_same_updates(optim.adamw(optax_schedule, weight_decay_mode="independent"),
                        optim.adamw(optax_schedule, weight_decay=1e-3), steps=3)
    with pytest.raises(ValueError, match=r"^weight_decay_mode .*'decoupled'"):
        optim.lion(0.1, weight_decay_mode="decoupled")
    with pytest.raises(ValueError, match=r"^peak learning_rate .*0"):
        optim.sgd(0.0, weight_decay=0.1, weight_decay_mode="independent")
    with pytest.raises(ValueError, match=r"weight_decay and weight_decay_rate.*0\.1.*0\.2"):
        optim.adafactor(weight_decay=0.1, weight_decay_rate=0.2)
    with pytest.raises(ValueError, match=r"mask and weight_decay_mask"):
        optim.adafactor(mask=MASK_TREE, weight_decay_mask=MASK_TREE)
    injected = optax.inject_hyperparams(optim.adamw)(learning_rate=0.1,
                                                     weight_decay_mode="independent")
    with pytest.raises(ValueError, match=r"static_args=\('learning_rate',\)"):
        injected.init({"w": jnp.ones(3)})
    static = optax.inject_hyperparams(optim.adamw, static_args=("learning_rate",))(
        learning_rate=0.1, weight_decay=0.1, weight_decay_mode="independent")
    # Injected b2 is float32, so 1 - b2 differs from the Python value by ~5e-5 (as in optax).
    assert_same_updates(static, optim.adamw(0.1, weight_decay=0.1,
                                            weight_decay_mode="independent"), steps=3, rtol=1e-4,
                        atol=1e-5)


NEW_INVALID = [
    (optim.adam, dict(learning_rate=0.1, mu_dtype="int32"), "mu_dtype", "'int32'"),
    (optim.sgd, dict(learning_rate=0.1, momentum=0.9, accumulator_dtype=bool),
     "accumulator_dtype", "<class 'bool'>"),
    (optim.adafactor, dict(dtype_momentum="int8"), "dtype_momentum", "'int8'"),
    (optim.adafactor, dict(momentum=1.5), "momentum", "1.5"),
    (optim.adafactor, dict(weight_decay_rate=-0.1), "weight_decay_rate", "-0.1"),
    (optim.rmsprop, dict(learning_rate=0.1, initial_scale=-1.0), "initial_scale", "-1.0"),
]


@pytest.mark.parametrize("factory, kwargs, name, value", NEW_INVALID)
def test_new_arguments_are_validated(factory, kwargs, name, value):
    with pytest.raises(ValueError, match=rf"^{name} .*{re.escape(value)}$"):
        factory(**kwargs)


@pytest.mark.parametrize("factory, kwargs", [
    (optim.rmsprop, dict(learning_rate=LR)),
    (optim.rmsprop, dict(learning_rate=LR, momentum=0.0)),
    (optim.sgd, dict(learning_rate=LR)),
    (optim.sgd, dict(learning_rate=LR, momentum=0.0, weight_decay=0.0, mask=MASK_TREE)),
    (optim.adamw, dict(learning_rate=LR, weight_decay=0.0)),
], ids=["rmsprop", "rmsprop_momentum_zero", "sgd", "sgd_zeros_mask", "adamw_no_decay"])
def test_injected_zeros_build_the_same_chain(factory, kwargs):
    """Injected hyperparameters are arrays, so a Python 0 must not change the chain's state."""
    params = numpy_tree(0)
    plain, injected = factory(**kwargs), optax.inject_hyperparams(factory)(**kwargs)
    grads = numpy_tree(1)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # one program for both
    def both(grads, params):
        return (plain.update(grads, plain.init(params), params),
                injected.update(grads, injected.init(params), params))

    (updates, state), (injected_updates, injected_state) = both(grads, params)
    # Injected floats are float32 arrays (1 - b2 differs by ~5e-5 from Python's), as in optax.
    chex.assert_trees_all_close(injected_updates, updates, rtol=1e-4)
    chex.assert_trees_all_close(injected_state.inner_state, state, rtol=1e-4)


def test_structural_arguments_must_be_static_under_injection():
    injected = optax.inject_hyperparams(optim.adafactor)(learning_rate=LR)
    with pytest.raises(ValueError, match=r"^min_dim_size_to_factor .*static_args=\("
                                         r"'min_dim_size_to_factor',\)"):
        jax.jit(injected.init)(numpy_tree(0))
    static = optax.inject_hyperparams(optim.adafactor,
                                      static_args=("min_dim_size_to_factor",))(learning_rate=LR)
    assert_same_updates(static, optim.adafactor(LR), steps=3)


TRANSFORM_PAIRS = {
    "momentum_nesterov": (lambda: optim.scale_by_momentum(0.9, nesterov=True),
                          lambda: optax.trace(0.9, nesterov=True)),
    "adagrad": (lambda: optim.scale_by_adagrad(), lambda: optax.scale_by_rss()),
    "rms": (lambda: optim.scale_by_rms(0.9, bias_correction=True),
            lambda: optax.scale_by_rms(0.9, bias_correction=True)),
    "rms_centered": (lambda: optim.scale_by_rms(0.9, centered=True, eps_in_sqrt=False),
                     lambda: optax.scale_by_stddev(0.9, eps_in_sqrt=False)),
    "adam_nesterov": (lambda: optim.scale_by_adam(nesterov=True),
                      lambda: optax.scale_by_adam(nesterov=True)),
    "lion": (lambda: optim.scale_by_lion(), lambda: optax.scale_by_lion()),
}


class TransformsTest(chex.TestCase):
    """Each scale_by_* against its optax twin, jitted and not (three steps: eager is slow)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(case=sorted(TRANSFORM_PAIRS), dtype=["float32", "complex64"])
    def test_against_optax(self, case, dtype):
        ours, theirs = (make() for make in TRANSFORM_PAIRS[case])
        trees = [_complex_tree(seed) if dtype == "complex64" else numpy_tree(seed)
                 for seed in range(4)]
        params = trees[0]
        # Both updates in one function: one program to compile under jit, not two.
        both_updates = self.variant(lambda grads, our_state, their_state, params: (
            ours.update(grads, our_state, params), theirs.update(grads, their_state, params)))
        our_state, their_state = ours.init(params), theirs.init(params)
        for grads in trees[1:]:
            (updates, our_state), (expected, their_state) = both_updates(
                grads, our_state, their_state, params)
            chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
            chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop", "adam", "adamw", "lion",
                                  "adafactor", "decay_and_scale"])
def test_alias_docstrings_have_optax_sections(name):
    doc = getattr(optim, name).__doc__
    for section in ("Args:", "Returns:", "References:", "Examples:", ">>> "):
        assert section in doc, (name, section)
    assert "https://" in doc.split("References:")[1]
