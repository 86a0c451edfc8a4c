"""Shared test helpers: random pytrees and step-by-step comparison with an oracle."""
import jax
import jax.numpy as jnp
import numpy as np

# Scalars, vectors, matrices and a 4-D conv kernel: every optimizer must handle all of them.
MIXED_SHAPES = {"scalar": (), "bias": (7,), "dense": (16, 8), "conv": (3, 3, 4, 5)}


def random_tree(key, shapes=None, dtype=jnp.float32):
    """A dict pytree of normal random arrays with the given shapes."""
    shapes = MIXED_SHAPES if shapes is None else shapes
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.normal(k, shape, dtype)
        for k, (name, shape) in zip(keys, sorted(shapes.items()))
    }


def numpy_normal(seed, shape, dtype=jnp.float32):
    """Standard normal draws from numpy; `seed` an int or a tuple of ints. jax.random
    compiles a program for each shape it draws (~0.2 s each): for tests of many shapes."""
    seed = seed if isinstance(seed, int) else list(seed)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def numpy_tree(seed, shapes=None, dtype=jnp.float32):
    """Like `random_tree`, from numpy (`numpy_normal`): leaf i of the sorted names draws
    from seed (*seed, i)."""
    shapes = MIXED_SHAPES if shapes is None else shapes
    seed = (seed,) if isinstance(seed, int) else tuple(seed)
    return {name: numpy_normal((*seed, i), shape, dtype)
            for i, (name, shape) in enumerate(sorted(shapes.items()))}


def run_updates(tx, params, grads_seq):
    """Applies `tx` to a sequence of gradient trees; returns the list of update trees."""
    import optax

    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def stack_trees(trees):
    """A list of same-shaped trees as one tree of arrays with a leading step axis."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def scan_updates(txs, params, grads_seq, compiler_options=None):
    """Each transform's updates on the gradient trees `grads_seq`, stacked along a leading
    step axis, with params moved by its own updates (as `run_updates`: `init`, then `update`
    step after step). All the transforms' inits and steps run as one compiled `lax.scan`
    program: one compile instead of one per transform, no op-by-op init and no dispatch per
    step (for 20 steps or more, cheaper than a loop of jitted steps)."""
    import optax

    def run(tx, params, grads):
        def step(carry, g):
            params, state = carry
            updates, state = tx.update(g, state, params)
            return (optax.apply_updates(params, updates), state), updates
        return jax.lax.scan(step, (params, tx.init(params)), grads)[1]

    program = jax.jit(lambda params, grads: [run(tx, params, grads) for tx in txs],
                      compiler_options=compiler_options)
    return jax.device_get(program(params, stack_trees(grads_seq)))


def assert_same_updates(ours, theirs, steps=100, seed=0, shapes=None, rtol=1e-5, atol=1e-7,
                        numpy_draws=False, scanned=False, compiler_options=None):
    """Runs both transforms `steps` steps on the same random params and gradients and
    compares their updates. `numpy_draws`: the params and gradients from `numpy_tree`
    (params from seed `seed`, step t's gradients from (seed, 1 + t)) instead of jax.random.
    `scanned`: both transforms' steps in one program (`scan_updates`, with
    `compiler_options`) instead of a jitted step each; every step's update of every leaf is
    compared either way."""
    if numpy_draws:
        params = numpy_tree(seed, shapes)
        grads_seq = [numpy_tree((seed, 1 + t), shapes) for t in range(steps)]
    else:
        pkey, gkey = jax.random.split(jax.random.key(seed))
        params = random_tree(pkey, shapes)
        grads_seq = [random_tree(k, shapes) for k in jax.random.split(gkey, steps)]
    if scanned:
        a, b = scan_updates([ours, theirs], params, grads_seq, compiler_options)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol,
                                       err_msg=f"leaf {name}, axis 0 the step")
        return
    for t, (a, b) in enumerate(zip(run_updates(ours, params, grads_seq),
                                   run_updates(theirs, params, grads_seq))):
        for name in a:
            np.testing.assert_allclose(
                np.asarray(a[name]), np.asarray(b[name]), rtol=rtol, atol=atol,
                err_msg=f"step {t}, leaf {name}")
