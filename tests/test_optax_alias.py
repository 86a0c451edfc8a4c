"""The checks of optax's own alias tests (optax/_src/alias_test.py), written for every optimizer
in `optim.available()`: convergence on a parabola and on Rosenbrock's function (real, and
complex where the optimizer supports complex parameters), updates in the gradients' dtype,
explicit state dtypes kept, no recompilation across steps, `optax.MultiSteps`, extra
arguments to `update`, and `optax.inject_hyperparams` equal to the plain optimizer.

Kept cheap for CI: each run is one jitted `lax.scan`, so a compile dominates its time.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ravine import optim

# Keyword arguments per optimizer: optax's choices where optax has the optimizer. A new entry
# in optim.available() needs a row here (the test below says so).
CONFIGS = {
    "sgd": dict(learning_rate=1e-3, momentum=0.9),
    "adagrad": dict(learning_rate=1.0),
    "rmsprop": dict(learning_rate=5e-3, momentum=0.9),
    "adam": dict(learning_rate=0.1),
    "adamw": dict(learning_rate=0.1),
    "lion": dict(learning_rate=1e-2, weight_decay=1e-4),
    "adafactor": dict(learning_rate=5e-3),
    "shampoo": dict(learning_rate=0.1),
    "soap": dict(learning_rate=0.1, weight_decay=0.0),
    "muon": dict(learning_rate=0.1),
    "radam": dict(learning_rate=3e-2),
    "adamw_8bit": dict(learning_rate=0.1),
    "sophia": dict(learning_rate=3e-2, weight_decay=0.0),
    "schedule_free_adamw": dict(learning_rate=0.1),
    "ademamix": dict(learning_rate=1e-2),
    "adopt": dict(learning_rate=1e-2),
    # 1-D params go to MARS's AdamW branch: no decay there, the same lr
    "mars": dict(learning_rate=1e-2, weight_decay=0.0, adam_weight_decay=0.0,
                 adam_learning_rate=1e-2),
    "kron": dict(learning_rate=1e-2),
    "adamsage": dict(learning_rate=1e-2),
    "cautious_adamw": dict(learning_rate=0.1),  # AdamW's row: its cautious direction
}
# Deliberate: optimizers that cannot converge on these toy problems, and why.
STALLS = {"adamsage": "SAGE scales each step by the sensitivity |theta * g|, which is 0 where "
                      "a coordinate starts or crosses 0 (Rosenbrock starts at 0; the parabola's "
                      "coordinates cross it), so they stall; the authors apply it to pretrained "
                      "layers (optim/adamsage.py, sage_mask)"}
# Optimizers that optax runs on complex parameters (Lion: its sign is z/|z| there, as optax's).
COMPLEX = ("sgd", "adagrad", "rmsprop", "adam", "adamw", "lion", "adafactor")
# Structural integers (shapes of the state, Python control flow) and dtypes (a dtype class is a
# callable, which inject_hyperparams would call as a schedule) stay static under injection, as
# optax's own test does for adafactor.
STATIC_ARGS = {"adafactor": ("min_dim_size_to_factor",),
               "shampoo": ("block_size", "precondition_every", "start_preconditioning_step",
                           "statistics_dtype",
                           # shampoo.py compares b1 with 0 (momentum buffer or not) and b2
                           # with 1 (plain sums) in Python, so both must be static (for now).
                           "b1", "b2"),
               "soap": ("precondition_every", "max_precond_dim"),
               "muon": ("ns_steps", "ns_dtype"),
               "adamw_8bit": ("block_size", "min_8bit_size"),
               "sophia": ("hessian_every", "estimator"),
               "kron": ("max_size_triangular", "min_ndim_triangular")}
STEPS = 10_000


@pytest.fixture(autouse=True)
def _fresh_trace_counts():
    # chex.assert_max_traces counts per function body, across tests: each test starts at 0.
    chex.clear_trace_counter()


def _names():
    return optim.available()


def _make(name):
    if name not in CONFIGS:
        pytest.fail(f"optimizer {name!r} is in optim.available() but has no row in "
                    f"tests/test_optax_alias.py's CONFIGS")
    return optim.create(name, **CONFIGS[name])


def _parabola(dtype):
    initial = jnp.array([-1.0, 10.0, 1.0], dtype)
    final = jnp.array([1.0, -1.0, 1.0], dtype)
    if jnp.iscomplexobj(initial):
        final = final * (1 + 1j)
    return initial, final, lambda params: jnp.sum(jnp.abs(params - final) ** 2)


def _rosenbrock(dtype):
    a = (1 + 1j) if jnp.issubdtype(dtype, jnp.complexfloating) else 1.0
    initial = jnp.zeros(2, dtype)
    final = jnp.array([a, a ** 2], dtype)

    def objective(params):
        return jnp.abs(a - params[0]) ** 2 + 100 * jnp.abs(params[1] - params[0] ** 2) ** 2

    return initial, final, objective


CASES = [pytest.param(name, target, dtype, marks=pytest.mark.xfail(
             reason=STALLS[name], raises=AssertionError, strict=True)) if name in STALLS
         else (name, target, dtype)
         for name in _names() for target in ("parabola", "rosenbrock")
         for dtype in ("float32", "complex64") if dtype == "float32" or name in COMPLEX]


@pytest.mark.parametrize("name, target, dtype", CASES)
def test_optimization(name, target, dtype):
    tx = _make(name)
    initial, final, objective = {"parabola": _parabola,
                                 "rosenbrock": _rosenbrock}[target](jnp.dtype(dtype))

    def step(params, state):
        # A real loss of complex params: the descent direction is the conjugate gradient.
        grads = optax.tree.conj(jax.grad(objective)(params))
        # Sophia preconditions by a diagonal Hessian estimate the caller supplies (on its
        # refresh steps): Hutchinson's with one fixed probe, exact on a diagonal Hessian.
        extra = {"hessian_fn": lambda p: optim.sophia_estimates.hutchinson(
            objective, p, jax.random.key(0))} if name == "sophia" else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, state):
        return jax.lax.scan(lambda carry, _: (step(*carry), None), (params, state),
                            length=STEPS)[0]

    state = tx.init(initial)
    # optax.tree.map_params must see through the state (a no-op map keeps it).
    chex.assert_trees_all_equal(optax.tree.map_params(tx, lambda v: v, state), state)
    params, state = run(initial, state)
    chex.assert_tree_all_finite(params)
    chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)
    run(params, state)  # a second call must not trace again (assert_max_traces)


@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_updates_keep_dtype_and_state_is_stable(name, dtype):
    """Updates come in the gradients' dtype; state shapes and dtypes never change, so a
    step can sit in `lax.cond` next to "keep the old state", and jit traces once."""
    tx = _make(name)
    params = jnp.array([1.0, 2.0], jnp.dtype(dtype))
    grads = jax.grad(lambda x: jnp.sum(x ** 2))(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state, params, keep):
        new_updates, new_state = tx.update(grads, state, params)
        return new_updates, jax.lax.cond(keep, lambda: state, lambda: new_state)

    state = tx.init(params)
    for keep in (False, True, False):
        updates, state = step(grads, state, params, keep)
        assert updates.dtype == grads.dtype
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))


@pytest.mark.parametrize("name", _names())
def test_multi_steps_and_extra_args(name):
    """Inside `optax.MultiSteps` the updates of a non-final micro step are zero; `update`
    accepts (and ignores) extra keyword arguments, as optax's chains do."""
    tx = optax.MultiSteps(_make(name), every_k_schedule=4)
    params = jnp.array([1.0, 2.0])
    grads = jnp.array([2.0, 4.0])
    state = jax.jit(tx.init)(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal(updates, jnp.zeros_like(grads))

    plain = _make(name)
    extra = plain.update(grads, plain.init(params), params, unexpected_extra_arg=1)
    chex.assert_trees_all_close(extra, plain.update(grads, plain.init(params), params))


SHAPES = [(2, 3), (2, 5, 2)]  # optax's test's shapes


@pytest.mark.parametrize("name", _names())
def test_inject_hyperparams_equals_plain(name):
    factory = getattr(optim, name)
    _make(name)  # fails with a clear message when CONFIGS lacks the name
    plain = factory(**CONFIGS[name])
    injected = optax.inject_hyperparams(factory, static_args=STATIC_ARGS.get(name, ()))(
        **CONFIGS[name])
    # Random, not constant: a rank-one statistic has a degenerate eigenbasis, which SOAP
    # and Shampoo would pick differently on rounding-level differences.
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in SHAPES]
    grads = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in SHAPES]

    updates, state = jax.jit(plain.update)(grads, jax.jit(plain.init)(params), params)
    injected_updates, injected_state = jax.jit(injected.update)(
        grads, jax.jit(injected.init)(params), params)
    # atol: Shampoo's and SOAP's eigenvectors leave float32 noise of ~1e-8 in zero entries.
    chex.assert_trees_all_close(injected_updates, updates, rtol=1e-3, atol=1e-6)
    chex.assert_trees_all_close(injected_state.inner_state, state, rtol=1e-4, atol=1e-6)


EXPLICIT_DTYPE = {  # optimizer -> (its state-dtype argument, the state field it sets)
    "sgd": ("accumulator_dtype", "trace"),
    "adam": ("mu_dtype", "mu"),
    "adamw": ("mu_dtype", "mu"),
    "lion": ("mu_dtype", "mu"),
}


@pytest.mark.parametrize("name", sorted(EXPLICIT_DTYPE))
@pytest.mark.parametrize("params_dtype", ["bfloat16", "float32", "complex64"])
@pytest.mark.parametrize("state_dtype", ["bfloat16", "float32", "complex64", None])
def test_explicit_state_dtype(name, params_dtype, state_dtype):
    argument, field = EXPLICIT_DTYPE[name]
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    tx = getattr(optim, name)(0.1, **kwargs, **{argument: state_dtype})
    params = jnp.zeros(2, params_dtype)
    moment = optax.tree.get(tx.init(params), field)
    expected = params.dtype if state_dtype is None else jnp.dtype(state_dtype)
    assert moment.dtype == expected
    if jnp.issubdtype(expected, jnp.complexfloating) != jnp.iscomplexobj(params):
        return  # optax allows mixing real and complex here; a step would drop imaginary parts
    # A step keeps it (the moment is cast back to its own dtype).
    _, state = jax.jit(tx.update)(jnp.ones(2, params_dtype), tx.init(params), params)
    assert optax.tree.get(state, field).dtype == expected


def test_every_optimizer_has_a_configuration():
    assert set(_names()) <= set(CONFIGS), sorted(set(_names()) - set(CONFIGS))
    assert np.all([name in _names() for name in COMPLEX])
