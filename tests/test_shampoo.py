"""Shampoo against numpy closed forms and optax, root refresh schedule, robustness, sharding."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ravine import optim
from tests import oracle
from tests.second_order import (array_collectives, assert_resumes_exactly, best_final_loss,
                                 kronecker_quadratic, run, sharded_run)

SMALL = {"bias": (7,), "dense": (16, 8)}
PURE = dict(b1=0.0, b2=1.0, grafting=None, precondition_every=1, start_preconditioning_step=0,
            relative_eps=False)


# Random data from numpy (tests.oracle.numpy_tree): jax.random compiles a program for each
# shape it draws (~0.2 s each, a seventh of this file's compiling); these oracles hold for
# any random data.
random_normal, random_tree = oracle.numpy_normal, oracle.numpy_tree
assert_same_updates = functools.partial(oracle.assert_same_updates, numpy_draws=True)


def grads_like(params, steps, seed=0):
    """`steps` random float32 gradient trees shaped like `params`."""
    leaves, treedef = jax.tree.flatten(params)
    return [treedef.unflatten([random_normal((seed, t, i), p.shape)
                               for i, p in enumerate(leaves)]) for t in range(steps)]


def numpy_root(matrix, p):
    w, v = np.linalg.eigh(matrix)
    return (v * w ** (-1.0 / p)) @ v.T


def numpy_shampoo_first_step(g, lr, eps, block_size):
    """-lr * G x_0 P_0 ... x_{k-1} P_{k-1} per block, P_j = (G_(j) G_(j)^T + eps I)^(-1/(2k))."""
    g = np.asarray(g, np.float64)
    k, out = g.ndim, np.zeros(g.shape)
    for corner in itertools.product(*[range(0, d, block_size) for d in g.shape]):
        where = tuple(slice(c, c + block_size) for c in corner)
        block = direction = g[where]
        for j in range(k):
            unfolded = np.moveaxis(block, j, 0).reshape(block.shape[j], -1)
            root = numpy_root(unfolded @ unfolded.T + eps * np.eye(block.shape[j]), 2 * k)
            direction = np.moveaxis(np.tensordot(root, direction, axes=(1, j)), 0, j)
        out[where] = -lr * direction
    return out


def test_first_step_is_the_closed_form():
    lr, eps, block_size = 0.1, 1e-6, 8
    shapes = {"one_block": (6, 7), "blocked": (10, 20),  # padded along both dims
              "order3": (4, 5, 6),  # -1/6 roots
              "order3_blocked": (10, 3, 9)}
    # jax.random's draws: the padded 2 x 4 corner block's statistics are rank deficient, and
    # other draws put its float32 root outside rtol=2e-3 of the float64 closed form.
    grads = oracle.random_tree(jax.random.key(3), shapes)
    tx = optim.shampoo(lr, eps=eps, block_size=block_size, **PURE)
    (updates,), _ = run(tx, jax.tree.map(jnp.zeros_like, grads), [grads])
    for name, g in grads.items():
        expected = numpy_shampoo_first_step(g, lr, eps, block_size)
        np.testing.assert_allclose(updates[name], expected, rtol=2e-3,
                                   atol=2e-4 * np.abs(expected).max(), err_msg=name)


def test_mixed_leaves_update_finitely():
    shapes = {"scalar": (), "bias": (7,), "dense": (200, 30), "conv": (3, 3, 8, 16)}
    params = random_tree(0, shapes)
    grads = grads_like(params, 3)
    tx = optim.shampoo(0.01, b1=0.0, b2=0.99, block_size=64, precondition_every=2,
                       start_preconditioning_step=1)
    ours, state = run(tx, params, grads)
    adam, _ = run(optax.adam(0.01, b1=0.0, b2=0.99), params, grads)
    for a, b in zip(ours, adam):
        for name in shapes:
            assert a[name].shape == shapes[name] and np.all(np.isfinite(a[name])), name
        for name in ("scalar", "bias"):  # not preconditioned: the grafting (Adam) step
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    for name in ("dense", "conv"):
        assert not np.allclose(ours[-1][name], adam[-1][name], rtol=1e-2), name
    blocks = state[0].blocks
    assert blocks["scalar"] is None and blocks["bias"] is None
    assert [s.shape for s in blocks["dense"].stats] == [(4, 1, 64, 64), (4, 1, 30, 30)]
    assert [s.shape for s in blocks["conv"].roots] == [(1, 1, 1, 1, n, n) for n in (3, 3, 8, 16)]


# The first refresh that is used (step 5) sees full-rank statistics: on a null space both
# roots are only as good as float32 eigenvalues near eps * lambda_max.
ROOTS_KWARGS = dict(block_size=8, precondition_every=5, start_preconditioning_step=5)


@pytest.fixture(scope="module")
def newton_run():
    """Params, 7 gradients and the updates of Shampoo with float32 Newton roots: the oracle
    of eigh roots and of Newton roots from bfloat16 products (compiled once for both)."""
    params = random_tree(0, {"matrix": (16, 12), "tensor": (4, 4, 4)})
    grads = grads_like(params, 7)
    newton, _ = run(optim.shampoo(0.01, inverse_root="newton", **ROOTS_KWARGS), params, grads)
    return params, grads, newton


def test_eigh_and_newton_agree(newton_run):
    params, grads, newton = newton_run
    eigh, _ = run(optim.shampoo(0.01, inverse_root="eigh", **ROOTS_KWARGS), params, grads)
    for t, (a, b) in enumerate(zip(eigh, newton)):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-6,
                                       err_msg=f"step {t}, {name}")


def test_newton_roots_from_bfloat16_products_give_the_float32_updates(newton_run):
    params, grads, float32 = newton_run
    bfloat16, _ = run(optim.shampoo(0.01, inverse_root="newton", newton_precision="bfloat16_6x",
                                    **ROOTS_KWARGS), params, grads)
    for t, (a, b) in enumerate(zip(float32, bfloat16)):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-7,
                                       err_msg=f"step {t}, {name}")


def test_newton_precision_needs_newton_roots():
    with pytest.raises(ValueError, match="newton_precision='bfloat16_6x' needs "
                                         "inverse_root='newton', got inverse_root='eigh'"):
        optim.shampoo(0.1, newton_precision="bfloat16_6x")


@pytest.mark.parametrize("grafting, oracle", [
    ("adam", lambda lr: optax.adam(lr, b1=0.0, b2=0.99, eps=1e-8)),
    ("rmsprop", lambda lr: optax.rmsprop(lr, decay=0.99, eps=1e-8)),
    ("sgd", optax.sgd),
])
def test_before_start_the_grafting_step_alone(grafting, oracle):
    # Every step precedes start_preconditioning_step: the update is the grafting optimizer's
    # (for every leaf, including the preconditioned ones).
    tx = optim.shampoo(0.05, b1=0.0, b2=0.99, grafting=grafting, graft_eps=1e-8,
                       start_preconditioning_step=10**6)
    assert_same_updates(tx, oracle(0.05), steps=30, rtol=1e-5, atol=1e-6, shapes=SMALL)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_on_the_direction(nesterov):
    b1, lr = 0.9, 0.05
    tx = optim.shampoo(lr, b1=b1, grafting="sgd", nesterov=nesterov,
                       start_preconditioning_step=10**6)
    params = random_tree(0, SMALL)
    grads = grads_like(params, 6)
    ours, _ = run(tx, params, grads)
    m = 0.0
    for t, (grad, update) in enumerate(zip(grads, ours), start=1):
        g = np.asarray(grad["dense"], np.float64)
        m = b1 * m + (1 - b1) * g
        step = m / (1 - b1 ** t)
        if nesterov:
            step = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
        np.testing.assert_allclose(update["dense"], -lr * step, rtol=1e-5, atol=1e-7)


def test_grafting_gives_each_block_the_grafting_norm():
    # With b1 = 0 the update of each block has exactly the norm of the Adam step's block.
    tx = optim.shampoo(1.0, b1=0.0, b2=0.9, block_size=8, precondition_every=1,
                       start_preconditioning_step=0)
    params = {"w": jnp.zeros((16, 12))}
    grads = grads_like(params, 3)
    ours, _ = run(tx, params, grads)
    adam, _ = run(optax.adam(1.0, b1=0.0, b2=0.9), params, grads)
    for a, b in zip(ours, adam):
        for rows, cols in itertools.product((slice(0, 8), slice(8, 16)), (slice(0, 8),
                                                                           slice(8, 12))):
            np.testing.assert_allclose(np.linalg.norm(a["w"][rows, cols]),
                                       np.linalg.norm(b["w"][rows, cols]), rtol=1e-5)
        assert not np.allclose(a["w"], b["w"], rtol=1e-2)  # same norms, other direction


def test_roots_refresh_every_precondition_every_steps_and_non_finite_ones_are_kept():
    every = 3
    tx = optim.shampoo(0.1, eps=1e-4, relative_eps=False, precondition_every=every,
                       start_preconditioning_step=0)
    params = {"w": jnp.zeros((6, 4))}
    state, update = tx.init(params), jax.jit(tx.update)
    previous = None
    for t, grads in enumerate(grads_like(params, 6)):
        _, state = update(grads, state, params)
        blocks = state[0].blocks["w"]
        if t % every == 0:  # refreshed from the statistics that include step t
            for stat, root in zip(blocks.stats, blocks.roots):
                s = np.asarray(stat[0, 0], np.float64)
                expected = numpy_root(s + 1e-4 * np.eye(len(s)), 4)
                np.testing.assert_allclose(root[0, 0], expected, rtol=1e-3, atol=1e-3)
        else:
            for root, old in zip(blocks.roots, previous):
                np.testing.assert_array_equal(root, old)
        previous = blocks.roots
    assert int(state[0].count) == 6
    # Step 6 refreshes, but its statistics are NaN: every root keeps its previous value.
    _, state = update({"w": jnp.full((6, 4), jnp.nan)}, state, params)
    for root, old in zip(state[0].blocks["w"].roots, previous):
        np.testing.assert_array_equal(root, old)


@pytest.mark.parametrize("inverse_root", ["eigh", "newton"])
@pytest.mark.parametrize("relative_eps", [True, False])
def test_rank_deficient_and_badly_scaled_statistics_give_no_nan(inverse_root, relative_eps):
    tx = optim.shampoo(0.1, precondition_every=1, start_preconditioning_step=0, block_size=8,
                       inverse_root=inverse_root, relative_eps=relative_eps)
    params = {"w": jnp.zeros((12, 10))}
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for trial in range(12):
        state = tx.init(params)
        for _ in range(3):
            rank = rng.integers(0, 4)
            g = rng.standard_normal((12, rank)) @ rng.standard_normal((rank, 10))
            g[rng.random(12) < 0.3] = 0.0  # whole zero rows: zero eigenvalues in L
            g *= 10.0 ** rng.uniform(-30, 15)
            updates, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
            assert np.all(np.isfinite(updates["w"])), trial
            assert all(np.all(np.isfinite(r)) for r in state[0].blocks["w"].roots), trial


def test_beats_tuned_adam_on_an_ill_conditioned_kronecker_quadratic():
    loss, w0 = kronecker_quadratic()
    adam = best_final_loss(optax.adam, loss, w0)
    ours = best_final_loss(optim.shampoo, loss, w0)
    assert ours < 0.1 * adam, (ours, adam)


@pytest.mark.parametrize("inverse_root", ["newton", "eigh"])
def test_state_of_a_sharded_leaf_stays_on_its_devices(inverse_root):
    tx = optim.shampoo(0.01, block_size=32, precondition_every=1, start_preconditioning_step=0,
                       inverse_root=inverse_root)
    sharded, state, compiled, local = sharded_run(tx)
    blocks = state[0].blocks["w"]
    for array in blocks.stats + blocks.roots:
        assert array.shape == (2, 8, 32, 32)
        assert array.sharding.spec == P(None, "tensor")  # grid dim 1 follows param dim 1
    assert state[0].momentum["w"].sharding.spec == P(None, "tensor")
    assert state[0].diagonal["w"].sharding.spec == P(None, "tensor")
    # Blocks aligned with the shards: statistics, roots and update need no communication.
    # (Except eigh on CPU, which runs one matrix per call and so gathers the batch: see
    # optim._blocks.per_matrix. Batched eigh on GPU/TPU stays local.)
    if inverse_root == "newton" or jax.default_backend() != "cpu":
        assert not array_collectives(compiled)
    for a, b in zip(sharded, local):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6)


# Two runs of Shampoo side by side under jax.vmap, as a vmapped sweep trains them, in a
# child process (a regression hangs instead of failing: the timeout turns it into a
# failure). Before optim._blocks.per_matrix kept eigh one matrix per LAPACK call under
# vmap, this program deadlocked XLA:CPU's thread pool on a 2-core machine.
VMAPPED_RUNS = """
import jax, jax.numpy as jnp, numpy as np, optax, optim
params = {f"w{i}": jnp.full((256, 256), 0.01 * (i + 1)) for i in range(2)}
tx = optim.shampoo(1e-3, block_size=128, precondition_every=2, start_preconditioning_step=0)

def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

def grads(t, run):
    key = jax.random.fold_in(jax.random.key(t), run)
    return jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)

runs = [(params, tx.init(params)) for _ in range(2)]
stacked = jax.tree.map(lambda *x: jnp.stack(x), *runs)
one, both = jax.jit(step), jax.jit(jax.vmap(step))
for t in range(4):
    stacked = both(*stacked, jax.tree.map(lambda *g: jnp.stack(g), grads(t, 0), grads(t, 1)))
    runs = [one(*state, grads(t, run)) for run, state in enumerate(runs)]
for run, (alone, _) in enumerate(runs):
    for name in alone:
        np.testing.assert_allclose(stacked[0][name][run], alone[name], rtol=1e-4, atol=1e-7)
print("same")
"""


@pytest.mark.slow
def test_vmapped_runs_with_eigh_roots_finish_and_equal_single_runs():
    import os, subprocess, sys  # noqa: E401, PLC0415
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run([sys.executable, "-c", VMAPPED_RUNS], cwd=root,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("two vmapped Shampoo runs with eigh roots hung (batched CPU eigh)")
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-3000:]


def test_resumes_exactly_from_a_restored_state():
    tx = optim.shampoo(0.1, block_size=4, precondition_every=3, start_preconditioning_step=4)
    assert_resumes_exactly(tx, random_tree(0, SMALL), steps=10, split=5)


def test_low_precision_statistics_and_params():
    tx = optim.shampoo(0.01, statistics_dtype=jnp.bfloat16, precondition_every=1,
                       start_preconditioning_step=0)
    params = random_tree(0, SMALL, dtype=jnp.bfloat16)
    grads = [jax.tree.map(lambda g: g.astype(jnp.bfloat16), g) for g in grads_like(params, 2)]
    updates, state = run(tx, params, grads)
    for name, u in updates[-1].items():
        assert u.dtype == jnp.bfloat16 and np.all(np.isfinite(np.float32(u))), name
    assert all(s.dtype == jnp.bfloat16 for s in state[0].blocks["dense"].stats)


def test_weight_decay_is_decoupled_and_masked():
    params = random_tree(0, SMALL)
    grads = grads_like(params, 2)
    mask = optim.decay_mask(params)
    plain, _ = run(optim.shampoo(0.1), params, grads)
    decayed, _ = run(optim.shampoo(0.1, weight_decay=0.5, mask=mask), params, grads)
    for a, b in zip(plain, decayed):
        for name, decays in mask.items():
            expected = a[name] - 0.1 * 0.5 * params[name] * decays
            np.testing.assert_allclose(b[name], expected, rtol=1e-5, atol=1e-7)


def test_created_by_name():
    assert "shampoo" in optim.available()
    tx = optim.create("shampoo", learning_rate=0.1, block_size=4, b1=0.0)
    state = tx.init({"w": jnp.zeros((8, 6))})
    assert state[0].momentum is None
    assert [s.shape for s in state[0].blocks["w"].stats] == [(2, 2, 4, 4)] * 2
    with pytest.raises(ValueError, match="block_sizes"):
        optim.create("shampoo", learning_rate=0.1, block_sizes=4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(b1=1.0), "b1"),
    (dict(b2=0.0), "b2"),
    (dict(b2=1.5), "b2"),
    (dict(eps=-1e-6), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(block_size=0), "block_size"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(start_preconditioning_step=-1), "start_preconditioning_step"),
    (dict(grafting="adagrad"), "grafting"),
    (dict(inverse_root="svd"), "inverse_root"),
    (dict(statistics_dtype=jnp.int32), "statistics_dtype"),
    (dict(statistics_dtype="no-such-dtype"), "statistics_dtype"),
    (dict(graft_eps=-1.0), "graft_eps"),
    (dict(inverse_root="newton", newton_precision="bfloat16"), "newton_precision"),
])
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        optim.shampoo(**kwargs)


STRUCTURAL = ("block_size", "start_preconditioning_step", "statistics_dtype")


def test_inject_hyperparams_works_with_the_structural_args_static_and_says_so_otherwise():
    # b1, b2, eps, ... arrive as traced arrays (b2's "plain sums at 1" is decided by value).
    # Roots from full-rank statistics (4 gradients of a 6 x 5 leaf): the root of a rank-
    # deficient one amplifies rounding, which differs between traced and constant eps.
    shapes = {"w": (6, 5), "b": (5,)}
    hparams = dict(learning_rate=0.1, b1=0.9, b2=0.99, precondition_every=3,
                   start_preconditioning_step=3)
    injected = optax.inject_hyperparams(optim.shampoo, static_args=STRUCTURAL)(**hparams)
    assert_same_updates(injected, optim.shampoo(**hparams), steps=5, shapes=shapes,
                        rtol=1e-4, atol=1e-6)
    traced = optax.inject_hyperparams(optim.shampoo)(learning_rate=0.1)
    with pytest.raises(ValueError, match=r"static_args=\('block_size', "
                                         r"'start_preconditioning_step', 'statistics_dtype'\)"):
        jax.jit(traced.init)(random_tree(0, shapes))


def test_complex_params_are_rejected_naming_the_leaf():
    with pytest.raises(ValueError, match=r"complex params.*\['w'\]"):
        optim.shampoo(0.1).init({"w": jnp.ones((3, 2), jnp.complex64)})
