"""Cautious updates: drop the coordinates of a step that would go uphill on this gradient.

Any momentum optimizer steps along a direction that lags the current gradient; where the two
disagree in sign, the step increases the loss to first order. The cautious variant zeroes
those coordinates and scales the rest up so the step keeps its size on average:

    phi = 1[u * g < 0]                 (u: the step to add; u * g < 0 is descent)
    u   <- u * phi / max(mean(phi), eps)

per leaf (the official code's per-tensor mean, clamped at 1e-3). It keeps the wrapped
optimizer's state untouched, so `cautious(tx)` has `tx`'s state and any optimizer can be
wrapped. `cautious_adamw` is the paper's C-AdamW, registered as "cautious_adamw": Adam's
direction masked, decoupled weight decay outside the mask.

References:
  Liang, Chen, Liu & Liu, 2024, "Cautious Optimizers: Improving Training with One Line of
  Code", https://arxiv.org/abs/2411.16085; official code: github.com/kyleliang919/C-Optim.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import MaskOrFn, ScalarOrSchedule, decay_and_scale
from ravine.optim.transforms import scale_by_adam


def cautious(tx: optax.GradientTransformation, eps: float = 1e-3, *,
             direction: bool = False) -> optax.GradientTransformationExtraArgs:
    """Wraps `tx` so each leaf's update keeps only the coordinates that descend on `g`.

    With `u` the update `tx` returns for the gradient `g` (optax's convention: `u` is
    *added* to the params, so a coordinate descends where `u * g < 0`):

        phi = 1[u * g < 0],    u_cautious = u * phi / max(mean(phi), eps)

    the mean taken over each leaf. Coordinates where `u` or `g` is 0 count as not agreeing
    (the official code's strict `m * g > 0`).

    Weight decay. Wrapping a full optimizer (`cautious(optim.adamw(...))`) masks its whole
    step, decay included: the generic rule of the paper applied to that step. The official
    C-AdamW masks Adam's direction only and decays every coordinate; that is the wrapper
    on the direction, with `direction=True`, followed by decay and the learning rate:

        optax.chain(cautious(optim.scale_by_adam(), direction=True),
                    optim.decay_and_scale(lr, weight_decay))

    Args:
      tx: any `optax.GradientTransformation` (extra update arguments are passed through).
      eps: floor of the kept fraction `mean(phi)`, > 0 (the official 1e-3): a leaf keeping
        fewer coordinates is scaled by at most `1 / eps`.
      direction: `tx` returns a descent *direction* (a `scale_by_*` transform, aligned
        with `g`, to be subtracted by a later learning-rate step) rather than a step to
        add; its coordinates then agree where `u * g > 0`.

    Returns:
      An `optax.GradientTransformationExtraArgs` with `tx`'s init and state.

    References:
      Liang et al., `Cautious Optimizers: Improving Training with One Line of Code
      <https://arxiv.org/abs/2411.16085>`_, 2024.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> from ravine.optim.cautious import cautious
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = cautious(optim.adamw(learning_rate=0.1, weight_decay=0.0))
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(f"{f(params):.3f}")
      10.676
    """
    _validate.greater_than("eps", eps, 0)
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"tx must be an optax.GradientTransformation, got {tx!r}")
    inner = optax.with_extra_args_support(tx)

    def masked(u, g):
        agree = (u * g > 0) if direction else (u * g < 0)
        kept = jnp.mean(agree, dtype=jnp.float32)
        return jnp.where(agree, u / jnp.maximum(kept, eps).astype(u.dtype),
                         jnp.zeros_like(u))

    def update_fn(updates, state, params=None, **extra_args):
        steps, state = inner.update(updates, state, params, **extra_args)
        return jax.tree.map(masked, steps, updates), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def cautious_adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 1e-4, mask: MaskOrFn = None,
                   eps_root: float = 0.0, mu_dtype: Optional[Any] = None,
                   nesterov: bool = False, weight_decay_mode: str = "lr_scaled",
                   cautious_eps: float = 1e-3) -> optax.GradientTransformation:
    """C-AdamW, the paper's cautious AdamW: AdamW whose Adam direction is made cautious.

    At step t, with `u` Adam's direction (`optim.scale_by_adam`: `m^ / (sqrt(v^) + eps)`,
    optax's placement of eps) and `g` the gradient, per leaf:

        phi = 1[u * g > 0],    u <- u * phi / max(mean(phi), cautious_eps)
        step = -lr_t * (u + weight_decay * w)

    The mask acts on Adam's direction only; the decoupled weight decay reaches every
    decayed coordinate, outside the mask, as the official C-AdamW (its decay is applied to
    the weights before the masked step: the same step, `w (1 - lr wd) - lr u`). It is

        optax.chain(cautious(scale_by_adam(...), direction=True),
                    decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))

    so it equals `cautious(optim.adamw(...))` at `weight_decay=0`, and differs from it with
    decay, where the generic wrapper masks the decay too. Adam's eps sits after the bias
    correction (optax's, as `optim.adamw`); the official code adds it to `sqrt(v)` before
    (PyTorch's), a difference of `eps / sqrt(1 - b2^t)` in the denominator. State: Adam's
    (two moments and a count), as `optim.adamw`.

    Args:
      learning_rate: a number or a schedule `step -> lr`.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: added to the root of the denominator, >= 0.
      weight_decay: decoupled weight decay coefficient, >= 0 (not masked).
      mask: which leaves are decayed (None: all).
      eps_root: added inside the root, >= 0.
      mu_dtype: dtype of the first moment (default: the params' dtype).
      nesterov: use Nesterov's momentum (NAdam's direction) for `u`.
      weight_decay_mode: "lr_scaled" or "independent" (see `optim.decay_and_scale`).
      cautious_eps: floor of the kept fraction `mean(phi)`, > 0 (the official 1e-3).

    Returns:
      An `optax.GradientTransformation` with Adam's state.

    References:
      Liang et al., `Cautious Optimizers: Improving Training with One Line of Code
      <https://arxiv.org/abs/2411.16085>`_, 2024 (C-AdamW); official code:
      github.com/kyleliang919/C-Optim (`c_adamw.py`).

      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.cautious_adamw(learning_rate=0.1, weight_decay=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(f"{f(params):.3f}")  # on a bowl every coordinate agrees: AdamW's 9.995
      9.995
    """
    _validate.greater_than("cautious_eps", cautious_eps, 0)
    return optax.chain(
        cautious(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
                 cautious_eps, direction=True),
        decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
