"""SOAP against optax.adam(w), a numpy closed form, its moment bookkeeping, and sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optim
from tests.oracle import assert_same_updates, random_tree
from tests.second_order import (assert_resumes_exactly, best_final_loss, grads_like,
                                 kronecker_quadratic, run, sharded_run)

B1, B2, EPS = 0.9, 0.99, 1e-8


def test_without_preconditioned_dims_it_is_exactly_adamw():
    # max_precond_dim=0: every dim keeps the identity basis.
    tx = optim.soap(0.01, b1=B1, b2=B2, eps=EPS, weight_decay=0.1, max_precond_dim=0)
    assert_same_updates(tx, optax.adamw(0.01, B1, B2, EPS, weight_decay=0.1))


def numpy_soap_two_steps(g0, g1, lr, shampoo_b2, max_precond_dim):
    """SOAP's first two updates of a matrix in float64: step 0 in the identity basis, step 1
    in the eigenbases of the statistics of step 0, the moments of step 0 rotated into them."""
    g0, g1 = np.asarray(g0, np.float64), np.asarray(g1, np.float64)

    def basis(stat):
        if len(stat) > max_precond_dim:
            return np.eye(len(stat))
        return np.linalg.eigh(stat)[1]

    q_l = basis((1 - shampoo_b2) * g0 @ g0.T)
    q_r = basis((1 - shampoo_b2) * g0.T @ g0)
    m, v = (1 - B1) * g0, (1 - B2) * g0 ** 2
    first = -lr * (m / (1 - B1)) / (np.sqrt(v / (1 - B2)) + EPS)
    m = q_l.T @ m @ q_r  # exact rotation of the first moment
    v = (q_l ** 2).T @ v @ q_r ** 2  # squared rotation of the second
    rotated = q_l.T @ g1 @ q_r
    m = B1 * m + (1 - B1) * rotated
    v = B2 * v + (1 - B2) * rotated ** 2
    second = -lr * q_l @ ((m / (1 - B1 ** 2)) / (np.sqrt(v / (1 - B2 ** 2)) + EPS)) @ q_r.T
    return first, second


@pytest.mark.parametrize("shape, max_precond_dim", [((6, 5), 100), ((12, 5), 10)])
def test_first_two_steps_are_the_closed_form(shape, max_precond_dim):
    lr, shampoo_b2 = 0.1, 0.9
    params = {"w": jnp.zeros(shape)}
    grads = grads_like(params, 2)
    tx = optim.soap(lr, b1=B1, b2=B2, eps=EPS, weight_decay=0.0, shampoo_b2=shampoo_b2,
                    max_precond_dim=max_precond_dim)
    ours, state = run(tx, params, grads)
    expected = numpy_soap_two_steps(grads[0]["w"], grads[1]["w"], lr, shampoo_b2,
                                    max_precond_dim)
    for t, (a, b) in enumerate(zip(ours, expected)):
        np.testing.assert_allclose(a["w"], b, rtol=1e-3, atol=1e-5, err_msg=f"step {t}")
    shapes = [None if s is None else s.shape for s in state[0].bases["w"].stats]
    assert shapes == [(n, n) if n <= max_precond_dim else None for n in shape]


def test_unpreconditioned_leaves_are_adam():
    params = random_tree(jax.random.key(0))
    grads = grads_like(params, 5)
    ours, state = run(optim.soap(0.01, b1=B1, b2=B2, weight_decay=0.0), params, grads)
    adam, _ = run(optax.adam(0.01, B1, B2), params, grads)
    for a, b in zip(ours, adam):
        for name in ("scalar", "bias"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    assert state[0].bases["scalar"] is None and state[0].bases["bias"] is None
    assert not np.allclose(ours[-1]["dense"], adam[-1]["dense"], rtol=1e-2)


def test_moments_follow_every_change_of_basis():
    # m lives in the eigenbasis; rotated back it must be the plain EMA of the gradients,
    # across several power-step refreshes (every 3 steps).
    params = {"w": jnp.zeros((12, 7))}
    grads = grads_like(params, 10)
    _, state = run(optim.soap(0.1, b1=B1, b2=B2, precondition_every=3), params, grads)
    ema = 0.0
    for g in grads:
        ema = B1 * ema + (1 - B1) * np.asarray(g["w"], np.float64)
    q_l, q_r = (np.asarray(q, np.float64) for q in state[0].bases["w"].bases)
    np.testing.assert_allclose(q_l @ np.asarray(state[0].mu["w"]) @ q_r.T, ema, atol=1e-5)
    for q in (q_l, q_r):
        np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)


def test_power_steps_track_the_eigenvectors():
    # Gradients with a fixed covariance: one power step per step keeps Q^T S Q diagonal.
    n = 8
    scales = np.logspace(0, -2, n)
    keys = jax.random.split(jax.random.key(0), 40)
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))[0]
    grads = [{"w": jnp.asarray(rotation @ (scales[:, None] * np.asarray(
        jax.random.normal(k, (n, 64)))), jnp.float32)} for k in keys]
    _, state = run(optim.soap(0.1, precondition_every=1, shampoo_b2=0.99),
                   {"w": jnp.zeros((n, 64))}, grads)
    stat = np.asarray(state[0].bases["w"].stats[0], np.float64)
    q = np.asarray(state[0].bases["w"].bases[0], np.float64)
    rotated = q.T @ stat @ q
    off_diagonal = rotated - np.diag(np.diag(rotated))
    assert np.linalg.norm(off_diagonal) < 2e-3 * np.linalg.norm(stat)
    assert np.all(np.diff(np.diag(rotated)) <= 0)  # columns by decreasing eigenvalue


def test_beats_tuned_adam_on_an_ill_conditioned_kronecker_quadratic():
    loss, w0 = kronecker_quadratic()
    adam = best_final_loss(optax.adam, loss, w0)
    ours = best_final_loss(lambda lr: optim.soap(lr, weight_decay=0.0), loss, w0)
    assert ours < 0.5 * adam, (ours, adam)


def test_state_follows_a_sharded_param():
    # A square leaf: its statistics have full rank from step 0, so the eigenbases (and the
    # updates) do not depend on how an eigensolver picks vectors inside a null space.
    sharded, state, _, local = sharded_run(optim.soap(0.01, precondition_every=1), (32, 32))
    for moment in (state[0].mu["w"], state[0].nu["w"]):
        assert moment.sharding.spec == P(None, "tensor")
    stats = state[0].bases["w"].stats + state[0].bases["w"].bases
    assert not all(s.sharding.is_fully_replicated for s in stats)
    for a, b in zip(sharded, local):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_resumes_exactly_from_a_restored_state():
    tx = optim.soap(0.1, precondition_every=3)
    params = random_tree(jax.random.key(0), {"dense": (6, 5), "bias": (5,)})
    assert_resumes_exactly(tx, params, steps=8, split=4)


def test_created_by_name():
    assert "soap" in optim.available()
    state = optim.create("soap", learning_rate=0.1, max_precond_dim=6).init(
        {"w": jnp.zeros((8, 6))})
    assert [None if s is None else s.shape for s in state[0].bases["w"].stats] == [None, (6, 6)]


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(b1=1.0), "b1"),
    (dict(b2=1.0), "b2"),
    (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(max_precond_dim=-1), "max_precond_dim"),
    (dict(shampoo_b2=1.0), "shampoo_b2"),
])
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        optim.soap(**kwargs)
