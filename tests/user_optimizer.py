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


if hasattr(optim, "register") and "signum" not in optim.available():
    optim.register("signum", signum)
