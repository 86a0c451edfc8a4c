"""Per-leaf learning-rate multipliers: `scale_by_multipliers`, one factor per param leaf.

The width-dependent learning rates of μP (Yang et al. 2022, Tensor Programs V) are one
number per parameter; appending this transform to any optimizer applies them without
touching the optimizer:

    tx = optax.chain(optim.adamw(3e-3, weight_decay=0.1, mask=optim.decay_mask),
                     optim.scale_by_multipliers(models.mup_lr_multipliers(params, config)))

Placed last, it multiplies the optimizer's whole step, `-lr_t * (direction + wd * w)`, so
an lr-scaled weight decay is multiplied by the same factor (what the mup package's MuAdam
does: it scales each group's lr, and PyTorch's AdamW multiplies its decay by that lr). A
decay that does not follow the lr (`weight_decay_mode="independent"`) is multiplied too when
the transform sits after the optimizer; put it before the decay in a hand-built chain to
leave the decay alone.

Which factors: for Adam-family optimizers (and Shampoo with Adam grafting) μP's hidden
matrices get base_width / width; Muon's and SOAP's steps on a hidden matrix are already
width-independent in spectral norm, so they get 1. `models.mup_lr_multipliers` documents
and tests this (`optimizer=` "adam", "shampoo", "muon", "soap").

References:
  Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
  Hyperparameter Transfer", https://arxiv.org/abs/2203.03466
"""
import math
import numbers
from typing import Any, Callable, Union

import jax
import numpy as np
import optax


def _check_multiplier(path, value):
    # Python or NumPy real numbers (not arrays: one static factor per leaf), bools excluded.
    number = float(value) if isinstance(value, numbers.Real) else None
    if number is None or isinstance(value, (bool, np.bool_)) or not math.isfinite(number) \
            or number < 0:
        raise ValueError(f"multipliers must be non-negative finite numbers, got {value!r} at "
                         f"{jax.tree_util.keystr(path)}")


def scale_by_multipliers(multipliers: Union[Any, Callable[[optax.Params], Any]]
                         ) -> optax.GradientTransformation:
    """Multiplies each leaf of the updates by its own constant factor.

    `updates[leaf] <- multipliers[leaf] * updates[leaf]`. Stateless; jit-, vmap- and
    sharding-friendly (a Python float times an array keeps its sharding and dtype).

    Args:
      multipliers: a pytree of Python (or NumPy) numbers with the params' structure (e.g.
        `models.mup_lr_multipliers(params, config)`), or a callable `params -> such a
        pytree`, called on the params given to `init` and to `update`.

    Returns:
      An `optax.GradientTransformation` with an empty state.

    Raises:
      ValueError: naming the leaf, for a multiplier that is not a non-negative finite
        number (checked eagerly for a pytree, at `init` for a callable).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> tx = optax.chain(optim.adam(1e-3), optim.scale_by_multipliers({"w": 0.25, "b": 1.0}))
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> updates, state = tx.update(params, tx.init(params), params)  # grads = params here
      >>> jax.tree.map(lambda u: round(float(u.mean()) / 1e-3, 3), updates)  # in units of lr
      {'b': -1.0, 'w': -0.25}
    """
    def resolve(params):
        tree = multipliers(params) if callable(multipliers) else multipliers
        jax.tree.map_with_path(_check_multiplier, tree)
        return tree

    if not callable(multipliers):
        resolve(None)

    def init_fn(params):
        if callable(multipliers):
            resolve(params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if callable(multipliers) and params is None:
            raise ValueError("scale_by_multipliers with a callable needs params in update")
        tree = multipliers(params) if callable(multipliers) else multipliers
        return jax.tree.map(lambda m, u: u * m, tree, updates), state

    return optax.GradientTransformation(init_fn, update_fn)
