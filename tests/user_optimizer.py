"""A user's optimizer, defined outside ravine and registered on import: the file the README's
"race your own optimizer" section shows (tests/test_workflow.py imports it through
`--optimizer_module=tests.user_optimizer`)."""
import jax
import jax.numpy as jnp
import optax

from ravine import optim


def signum(learning_rate, momentum=0.9, sign_eps=0.0):
    """Signum (Bernstein et al., 2018, https://arxiv.org/abs/1802.04434): the step is
    `-lr * sign(m)` with `m <- momentum * m + (1 - momentum) * g`. `sign_eps` leaves
    entries with |m| <= sign_eps at 0 (it exists to show a hyperparameter of one's own)."""

    def init_fn(params):
        return {"m": jax.tree.map(jnp.zeros_like, params)}

    def update_fn(updates, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, state["m"], updates)
        direction = jax.tree.map(lambda m: jnp.where(jnp.abs(m) > sign_eps, jnp.sign(m), 0.0), m)
        return direction, {"m": m}

    return optax.chain(optax.GradientTransformation(init_fn, update_fn),
                       optax.scale_by_learning_rate(learning_rate))


def polyak_sgd(learning_rate, decay=0.9):
    """SGD that also keeps an exponential average of its iterates (Polyak-Ruppert style),
    the point it is evaluated at: a Schedule-Free-like optimizer whose eval params are not
    its params. The state is `{"average": tree}`; the average starts at the first params."""

    def init_fn(params):
        return {"average": jax.tree.map(jnp.asarray, params), "count": jnp.zeros((), jnp.int32)}

    def update_fn(updates, state, params):
        lr = learning_rate(state["count"]) if callable(learning_rate) else learning_rate
        step = jax.tree.map(lambda g: -lr * g, updates)
        new = optax.apply_updates(params, step)
        average = jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, state["average"], new)
        return step, {"average": average, "count": state["count"] + 1}

    return optax.GradientTransformation(init_fn, update_fn)


def polyak_eval_params(params, opt_state):
    del params
    return opt_state["average"]


# Each optimizer's needs travel with it (no ravine file edited): signum's own lr centre for
# the race's grid, polyak_sgd's eval params.
if "signum" not in optim.available():
    optim.register("signum", signum, centre_lr=0.05)
if "polyak_sgd" not in optim.available():
    optim.register("polyak_sgd", polyak_sgd, centre_lr=0.1, eval_params=polyak_eval_params)
