"""RAdam against optax.radam (and optax.radam + decoupled decay in ravine's order)."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ravine import optim
from tests.oracle import assert_same_updates

LR = 0.01
MASK_TREE = {"scalar": False, "bias": False, "dense": True, "conv": True}
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.05, warmup_steps=10, decay_steps=100)


def _radam_then_decay(weight_decay, mask, learning_rate, **kwargs):
    """optax.radam's direction, then decoupled decay, then the learning rate."""
    return optax.chain(optax.scale_by_radam(**kwargs),
                       optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


@pytest.mark.parametrize("ours, theirs", [
    (lambda: optim.radam(LR), lambda: optax.radam(LR)),
    # threshold 4 (the paper's) and b2 0.99 switch to the adaptive step at another step.
    (lambda: optim.radam(LR, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8, threshold=4.0),
     lambda: optax.radam(LR, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8, threshold=4.0)),
    (lambda: optim.radam(SCHEDULE), lambda: optax.radam(SCHEDULE)),
    (lambda: optim.radam(LR, weight_decay=0.1, mask=MASK_TREE),
     lambda: _radam_then_decay(0.1, MASK_TREE, LR)),
    (lambda: optim.radam(LR, b2=0.95, weight_decay=0.05, mask=optim.decay_mask),
     lambda: _radam_then_decay(0.05, optim.decay_mask, LR, b2=0.95)),
], ids=["defaults", "args", "schedule", "decay_mask_tree", "decay_mask_callable"])
def test_radam_equals_optax(ours, theirs):
    assert_same_updates(ours(), theirs(), steps=100)


def test_radam_switches_from_momentum_to_the_rectified_step():
    """rho_t first reaches 5 at step 6 for b2=0.999: steps 1-5 are m^, then r_t m^/sqrt(v^)."""
    tx = optim.scale_by_radam()
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    for step in range(1, 8):
        updates, state = tx.update(grads, state, params)
        b2t = 0.999 ** step
        rho = 2 / 0.001 - 1 - 2 * step * b2t / (1 - b2t)
        if rho < 5:
            np.testing.assert_allclose(updates["w"], grads["w"], rtol=1e-5)  # m^ = g
        else:
            rho_inf = 2 / 0.001 - 1
            r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            # 1 - b2^t loses digits in float32, and r is steep in rho near 4: 1% here.
            np.testing.assert_allclose(updates["w"], r * np.sign(grads["w"]), rtol=1e-2)
    assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"),
    (dict(threshold=-1.0), "threshold"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(learning_rate=-1.0), "learning_rate")])
def test_bad_hyperparameters_name_the_value(kwargs, match):
    kwargs = {"learning_rate": LR, **kwargs}
    with pytest.raises(ValueError, match=match):
        optim.radam(**kwargs)
