"""Shared by test_shampoo and test_soap: an ill-conditioned Kronecker quadratic, a learning
rate sweep on it, and a sharded run of an optimizer on 8 CPU devices."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ravine import sharding

LEARNING_RATES = tuple(np.logspace(-3, 0, 7))
COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter)\(")


def array_collectives(hlo_text):
    """The collective instructions of compiled HLO whose result is not a scalar (a scalar
    all-reduce is loop control, e.g. "any block still iterating"; it moves no blocks)."""
    return [line.strip() for line in hlo_text.splitlines()
            if COLLECTIVES.search(line) and not re.search(r"= \w+\[\] ", line)]


def _spd(key, n, cond):
    """A random symmetric positive definite matrix with eigenvalues from 1 down to 1/cond."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return (q * jnp.logspace(0, -np.log10(cond), n)) @ q.T


def kronecker_quadratic(rows=16, cols=12, cond=1e3, seed=0):
    """`f(W) = 1/2 tr((W - W*)^T A (W - W*) B)` with cond(A) = cond(B) = `cond`.

    Its Hessian A (x) B has condition number cond^2 and eigenvectors that are not axis
    aligned, so diagonal methods (Adam) cannot undo it while Kronecker-factored ones can.
    """
    ka, kb, kw = jax.random.split(jax.random.key(seed), 3)
    a, b = _spd(ka, rows, cond), _spd(kb, cols, cond)
    target = jax.random.normal(kw, (rows, cols))

    def loss(w):
        d = w - target
        return 0.5 * jnp.trace(d.T @ a @ d @ b)

    return loss, jnp.zeros((rows, cols))


def best_final_loss(make_tx, loss, w0, steps=200, learning_rates=LEARNING_RATES):
    """Lowest loss after `steps` steps of `make_tx(lr)` over the learning rate grid.

    The learning rate enters as a schedule returning a traced value, so one compilation
    serves the whole grid.
    """
    @jax.jit
    def final_loss(lr):
        tx = make_tx(lambda _: lr)

        def step(carry, _):
            w, state = carry
            updates, state = tx.update(jax.grad(loss)(w), state, w)
            return (optax.apply_updates(w, updates), state), None

        (w, _), _ = jax.lax.scan(step, (w0, tx.init(w0)), None, length=steps)
        return loss(w)

    losses = np.array([float(final_loss(lr)) for lr in learning_rates])
    return np.nanmin(losses)


def sharded_run(tx, shape=(64, 256), steps=3):
    """Runs `tx` on a leaf sharded over 8 devices on dim 1 (and a replicated bias).

    The state starts laid out by `sharding.optimizer_state_shardings`; the first update is
    jitted with the params' shardings in and the new state's layout left to GSPMD, the
    following ones with that layout fixed as in/out shardings. Returns the updates, the state
    after the first update, the compiled text of the fixed-layout update and the updates of
    the same run on one device (to compare with).
    """
    mesh = sharding.make_mesh("data=1,fsdp=1,tensor=8")
    param_sh = {"w": NamedSharding(mesh, P(None, "tensor")), "b": NamedSharding(mesh, P())}
    keys = jax.random.split(jax.random.key(1), steps + 1)
    params = {"w": jax.random.normal(keys[0], shape), "b": jnp.ones((7,))}
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params)
             for k in keys[1:]]

    state_sh = sharding.optimizer_state_shardings(tx, params, param_sh)
    with jax.set_mesh(mesh):  # as sharding.jit_train_step traces a train step
        state = jax.jit(tx.init, out_shardings=state_sh)(jax.device_put(params, param_sh))
        first = jax.jit(tx.update, in_shardings=(param_sh, state_sh, param_sh))
        updates, state = first(grads[0], state, params)
        first_state = state
        layout = jax.tree.map(lambda x: x.sharding, state)
        fixed = jax.jit(tx.update, in_shardings=(param_sh, layout, param_sh),
                        out_shardings=(param_sh, layout)).lower(grads[0], state, params)
        fixed = fixed.compile()
        sharded = [updates]
        for g in grads[1:]:
            updates, state = fixed(g, state, params)
            sharded.append(updates)

    local_update, local_params = jax.jit(tx.update), jax.device_get(params)
    local_state, local = tx.init(local_params), []
    for g in grads:
        updates, local_state = local_update(jax.device_get(g), local_state, local_params)
        local.append(updates)
    return sharded, first_state, fixed.as_text(), local


def run(tx, params, grads_seq):
    """The updates of `tx` (jitted) for each gradient in turn, and the final state."""
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        out.append(updates)
    return out, state


def grads_like(params, steps, seed=0, scale=1.0):
    """`steps` random gradient trees shaped like `params`."""
    return [jax.tree.map(lambda p, k=k: scale * jax.random.normal(k, p.shape), params)
            for k in jax.random.split(jax.random.key(seed), steps)]


def assert_resumes_exactly(tx, params, steps, split):
    """Stopping after `split` steps, round-tripping the state through host numpy and going
    on gives bit-identical updates to an uninterrupted run."""
    grads = grads_like(params, steps)
    straight, _ = run(tx, params, grads)
    _, state = run(tx, params, grads[:split])
    restored = jax.tree.map(lambda x: jnp.asarray(np.array(x)), jax.device_get(state))
    update = jax.jit(tx.update)
    for want, g in zip(straight[split:], grads[split:]):
        got, restored = update(g, restored, params)
        for name in want:
            np.testing.assert_array_equal(want[name], got[name])
