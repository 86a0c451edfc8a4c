"""The checks of optax's own alias tests (optax/_src/alias_test.py), written for every optimizer
in `optim.available()`: convergence on a parabola and on Rosenbrock's function (real, and
complex where the optimizer supports complex parameters), updates in the gradients' dtype,
explicit state dtypes kept, no recompilation across steps, `optax.MultiSteps`, extra
arguments to `update`, and `optax.inject_hyperparams` equal to the plain optimizer.

Kept cheap for CI: the time is compiling (one update per optimizer and case), so each test
compiles one program for all its cases (see `_results_of`); each convergence run in it is a
`lax.scan`.
"""
import functools

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


NAMES = tuple(_names())


def _dtypes_of(name):
    return ("float32", "complex64") if name in COMPLEX else ("float32",)


TARGETS = {"parabola": _parabola, "rosenbrock": _rosenbrock}
OPTIMIZATION_KEYS = tuple((name, target, dtype) for name in NAMES for target in TARGETS
                          for dtype in _dtypes_of(name))
CASES = [pytest.param(*key, marks=pytest.mark.xfail(
             reason=STALLS[key[0]], raises=AssertionError, strict=True)) if key[0] in STALLS
         else key for key in OPTIMIZATION_KEYS]


# The tests below are compile-bound: a case's time is mostly compiling its optimizer's
# update, and much of a compile is the same for any program. So each test runs all its
# cases (its keys: the optimizer's name and what else its cases vary) in one jitted program
# of `compute(keys)` -> {key: results}, compiled and run by its first case, and each case
# checks its own results.
def _name_of(key):
    return key if isinstance(key, str) else key[0]


@functools.cache
def _all_at_once(compute, keys):
    try:
        return compute(keys)
    except Exception:  # noqa: BLE001 - a case's failure shows in that case (_results_of)
        return {}


def _results_of(compute, key, keys):
    """`key`'s results from the one program of all `keys` (of the optimizers that have a
    configuration); if that program failed, from a program of `key` alone, so a failure
    shows in its own case, as when each case compiled a program of its own."""
    results = _all_at_once(compute, tuple(k for k in keys if _name_of(k) in CONFIGS))
    if key in results:
        return results[key]
    chex.clear_trace_counter()  # the failed program's traces are not this one's
    return compute((key,))[key]


def _optimized(keys):
    """{(name, target, dtype): (params after STEPS steps, the optimum)}: every run a
    `lax.scan` from its own optimizer state, all in one jitted program."""
    txs = {name: _make(name) for name in {name for name, _, _ in keys}}
    problems = {(name, target, dtype): TARGETS[target](jnp.dtype(dtype))
                for name, target, dtype in keys}

    def step(name, objective, params, state):
        # A real loss of complex params: the descent direction is the conjugate gradient.
        grads = optax.tree.conj(jax.grad(objective)(params))
        # Sophia preconditions by a diagonal Hessian estimate the caller supplies (on its
        # refresh steps): Hutchinson's with one fixed probe, exact on a diagonal Hessian.
        extra = {"hessian_fn": lambda p: optim.sophia_estimates.hutchinson(
            objective, p, jax.random.key(0))} if name == "sophia" else {}
        updates, state = txs[name].update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(carries):
        return {key: jax.lax.scan(lambda carry, _, key=key: (
                    step(key[0], problems[key][2], *carry), None), carry, length=STEPS)[0]
                for key, carry in carries.items()}

    carries = {}
    for key, (initial, _, _) in problems.items():
        tx = txs[key[0]]
        state = tx.init(initial)
        # optax.tree.map_params must see through the state (a no-op map keeps it).
        chex.assert_trees_all_equal(optax.tree.map_params(tx, lambda v: v, state), state)
        carries[key] = (initial, state)
    out = run(carries)
    run(out)  # a second call must not trace again (assert_max_traces)
    return {key: (params, problems[key][1]) for key, (params, _) in out.items()}


@pytest.mark.parametrize("name, target, dtype", CASES)
def test_optimization(name, target, dtype):
    params, final = _results_of(_optimized, (name, target, dtype), OPTIMIZATION_KEYS)
    chex.assert_tree_all_finite(params)
    chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


DTYPES = ("bfloat16", "float32")
DTYPE_KEYS = tuple((name, dtype) for name in NAMES for dtype in DTYPES)


def _steps_in_each_dtype(keys):
    """{(name, dtype): (grads, the updates' dtypes of three steps, the state after them,
    the params)}: every case's step in one jitted program, which must trace once over the
    three calls."""
    txs = {name: _make(name) for name in {name for name, _ in keys}}
    params = {dtype: jnp.array([1.0, 2.0], jnp.dtype(dtype)) for dtype in DTYPES}
    grads = {dtype: jax.grad(lambda x: jnp.sum(x ** 2))(p) for dtype, p in params.items()}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, states, params, keep):
        out = {}
        for (name, dtype), state in states.items():
            new_updates, new_state = txs[name].update(grads[dtype], state, params[dtype])
            out[name, dtype] = (new_updates, jax.lax.cond(
                keep, lambda state=state: state, lambda new_state=new_state: new_state))
        return out

    states = {(name, dtype): txs[name].init(params[dtype]) for name, dtype in keys}
    update_dtypes = {key: [] for key in keys}
    for keep in (False, True, False):
        for key, (updates, states[key]) in step(grads, states, params, keep).items():
            update_dtypes[key].append(updates.dtype)
    return {(name, dtype): (grads[dtype], update_dtypes[name, dtype], states[name, dtype],
                            params[dtype]) for name, dtype in keys}


@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("dtype", DTYPES)
def test_updates_keep_dtype_and_state_is_stable(name, dtype):
    """Updates come in the gradients' dtype; state shapes and dtypes never change, so a
    step can sit in `lax.cond` next to "keep the old state", and jit traces once."""
    grads, update_dtypes, state, params = _results_of(_steps_in_each_dtype, (name, dtype),
                                                      DTYPE_KEYS)
    assert update_dtypes == [grads.dtype] * 3
    chex.assert_trees_all_equal_shapes_and_dtypes(state, _make(name).init(params))


def _multi_step_updates(names):
    """{name: (grads, the MultiSteps updates of a first micro step, plain updates with an
    extra keyword argument, and without)}, every name's in one jitted program."""
    params = jnp.array([1.0, 2.0])
    grads = jnp.array([2.0, 4.0])
    txs = {name: (optax.MultiSteps(_make(name), every_k_schedule=4), _make(name))
           for name in names}

    @jax.jit
    def updates_of(grads, params):
        out = {}
        for name, (tx, plain) in txs.items():
            micro_step, _ = tx.update(grads, tx.init(params), params)
            extra, _ = plain.update(grads, plain.init(params), params, unexpected_extra_arg=1)
            without, _ = plain.update(grads, plain.init(params), params)
            out[name] = (grads, micro_step, extra, without)
        return out

    return updates_of(grads, params)


@pytest.mark.parametrize("name", _names())
def test_multi_steps_and_extra_args(name):
    """Inside `optax.MultiSteps` the updates of a non-final micro step are zero; `update`
    accepts (and ignores) extra keyword arguments, as optax's chains do."""
    grads, updates, extra, without = _results_of(_multi_step_updates, name, NAMES)
    chex.assert_trees_all_equal(updates, jnp.zeros_like(grads))
    chex.assert_trees_all_close(extra, without)


SHAPES = [(2, 3), (2, 5, 2)]  # optax's test's shapes


def _plain_and_injected(names):
    """{name: ((updates, state) of the plain optimizer, (updates, state) of the one made by
    optax.inject_hyperparams)} of one step, every name's in one jitted program. The injected
    hyperparameters are traced in it (`injected.init` makes them under this jit), as they
    were with init and update jitted apart."""
    pairs = {}
    for name in names:
        factory = getattr(optim, name)
        injected = optax.inject_hyperparams(factory, static_args=STATIC_ARGS.get(name, ()))
        pairs[name] = (factory(**CONFIGS[name]), injected(**CONFIGS[name]))
    # Random, not constant: a rank-one statistic has a degenerate eigenbasis, which SOAP
    # and Shampoo would pick differently on rounding-level differences.
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in SHAPES]
    grads = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in SHAPES]

    @jax.jit
    def updates_of(grads, params):
        return {name: (plain.update(grads, plain.init(params), params),
                       injected.update(grads, injected.init(params), params))
                for name, (plain, injected) in pairs.items()}

    return updates_of(grads, params)


@pytest.mark.parametrize("name", _names())
def test_inject_hyperparams_equals_plain(name):
    _make(name)  # fails with a clear message when CONFIGS lacks the name
    (updates, state), (injected_updates, injected_state) = _results_of(
        _plain_and_injected, name, NAMES)
    # atol: Shampoo's and SOAP's eigenvectors leave float32 noise of ~1e-8 in zero entries.
    chex.assert_trees_all_close(injected_updates, updates, rtol=1e-3, atol=1e-6)
    chex.assert_trees_all_close(injected_state.inner_state, state, rtol=1e-4, atol=1e-6)


EXPLICIT_DTYPE = {  # optimizer -> (its state-dtype argument, the state field it sets)
    "sgd": ("accumulator_dtype", "trace"),
    "adam": ("mu_dtype", "mu"),
    "adamw": ("mu_dtype", "mu"),
    "lion": ("mu_dtype", "mu"),
}


PARAMS_DTYPES = ("bfloat16", "float32", "complex64")
STATE_DTYPES = ("bfloat16", "float32", "complex64", None)


def _explicit_tx(name, state_dtype):
    argument, _ = EXPLICIT_DTYPE[name]
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    return getattr(optim, name)(0.1, **kwargs, **{argument: state_dtype})


def _expected_dtype(params_dtype, state_dtype):
    return jnp.dtype(params_dtype if state_dtype is None else state_dtype)


def _steps(params_dtype, state_dtype):
    """Whether the test takes a step: optax allows mixing real and complex in the state, but
    a step would drop imaginary parts."""
    expected = _expected_dtype(params_dtype, state_dtype)
    return (jnp.issubdtype(expected, jnp.complexfloating)
            == jnp.issubdtype(jnp.dtype(params_dtype), jnp.complexfloating))


STEPPED_KEYS = tuple((name, params_dtype, state_dtype) for name in sorted(EXPLICIT_DTYPE)
                     for params_dtype in PARAMS_DTYPES for state_dtype in STATE_DTYPES
                     if _steps(params_dtype, state_dtype))


def _moment_dtypes_after_a_step(keys):
    """{(name, params_dtype, state_dtype): the moment's dtype after one step}, each from its
    own optimizer and state, all in one jitted program."""
    runs = {}
    for name, params_dtype, state_dtype in keys:
        tx = _explicit_tx(name, state_dtype)
        params = jnp.zeros(2, params_dtype)
        runs[name, params_dtype, str(state_dtype)] = (tx, params, tx.init(params))

    @jax.jit
    def steps(params_and_states):
        return {key: runs[key][0].update(jnp.ones(2, params.dtype), state, params)[1]
                for key, (params, state) in params_and_states.items()}

    states = steps({key: (params, state) for key, (_, params, state) in runs.items()})
    return {(name, params_dtype, state_dtype):
            optax.tree.get(states[name, params_dtype, str(state_dtype)],
                           EXPLICIT_DTYPE[name][1]).dtype
            for name, params_dtype, state_dtype in keys}


@pytest.mark.parametrize("name", sorted(EXPLICIT_DTYPE))
@pytest.mark.parametrize("params_dtype", PARAMS_DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_explicit_state_dtype(name, params_dtype, state_dtype):
    _, field = EXPLICIT_DTYPE[name]
    tx = _explicit_tx(name, state_dtype)
    params = jnp.zeros(2, params_dtype)
    moment = optax.tree.get(tx.init(params), field)
    expected = _expected_dtype(params_dtype, state_dtype)
    assert moment.dtype == expected
    if not _steps(params_dtype, state_dtype):
        return  # optax allows mixing real and complex here; a step would drop imaginary parts
    # A step keeps it (the moment is cast back to its own dtype).
    key = (name, params_dtype, state_dtype)
    assert _results_of(_moment_dtypes_after_a_step, key, STEPPED_KEYS) == expected


def test_every_optimizer_has_a_configuration():
    assert set(_names()) <= set(CONFIGS), sorted(set(_names()) - set(CONFIGS))
    assert np.all([name in _names() for name in COMPLEX])
