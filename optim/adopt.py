"""ADOPT: Adam that normalizes the gradient by the *previous* second moment, then averages.

Adam divides the momentum by `sqrt(v_t)`, which contains the current gradient: the two are
correlated and Adam can diverge for some b2 (Reddi et al.'s counterexample). ADOPT divides
the gradient by `sqrt(v_{t-1})`, which does not contain it, and only then takes the momentum,
so it converges for any b2 at the optimal rate. The first step only initializes
`v = g^2` (the update is zero); optional clipping of the normalized gradient at
`t^(1/4)` keeps the early steps stable.

References:
  Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal
  Rate", https://arxiv.org/abs/2411.02853
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import MaskOrFn, decay_and_scale
from ravine.optim.transforms import AdamState


def scale_by_adopt(b1: float = 0.9, b2: float = 0.9999, eps: float = 1e-6,
                   mu_dtype: Optional[Any] = None, *, nesterov: bool = False,
                   use_clipping: bool = True,
                   clip_value_fn: Optional[Callable[[jax.Array], jax.Array]] = None
                   ) -> optax.GradientTransformation:
    """The ADOPT direction (no learning rate, no sign flip), as `optax.contrib.scale_by_adopt`.

    With `t` the step (from 0), `v_{-1} = 0`, `m_{-1} = 0`:

        t = 0:  v_0 = |g_0|^2, m_0 = 0                       (update 0)
        t > 0:  n_t = clip(g_t / max(sqrt(v_{t-1}), eps), -c_t, c_t),  c_t = clip_value_fn(t)
                m_t = b1 m_{t-1} + (1 - b1) n_t
                v_t = b2 v_{t-1} + (1 - b2) |g_t|^2
                update = m_t   (Nesterov: b1 m_t + (1 - b1) n_t)

    (At t = 0 the clip value `c_0 = 0` zeroes `n_0`; without clipping `n_0` is ignored.)

    Args:
      b1: decay of the momentum, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: floor of `sqrt(v)` in the normalization, >= 0.
      mu_dtype: dtype of the momentum (default: the params' dtype).
      nesterov: use Nesterov's look-ahead momentum.
      use_clipping: clip the normalized gradient at `clip_value_fn(t)`.
      clip_value_fn: `step -> clip value`; None (default) is `t^(1/4)`, the paper's and
        optax's default. (optax's default is that function itself; None here keeps
        `optax.inject_hyperparams`, which takes every callable argument for a schedule,
        working without `static_args`.)

    Returns:
      An `optax.GradientTransformation` whose state is an `AdamState(count, mu, nu)`.

    References:
      Taniguchi et al., `ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal
      Rate <https://arxiv.org/abs/2411.02853>`_, 2024.

    Example:
      >>> tx = optax.chain(scale_by_adopt(b2=0.999), optax.scale(-1e-3))
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)
    mu_dtype = _validate.state_dtype("mu_dtype", mu_dtype)
    if clip_value_fn is None:
        clip_value_fn = lambda count: count ** 0.25  # noqa: E731
    if not callable(clip_value_fn):
        raise ValueError(f"clip_value_fn must be a callable step -> clip value, got "
                         f"{clip_value_fn!r}; with optax.inject_hyperparams pass "
                         f"static_args=('clip_value_fn',)")

    def init_fn(params):
        return AdamState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                         nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0
        # Step 0 only sets v = g^2 (b2 -> 0) and keeps m = 0 (b1 -> 1).
        b1_t = jnp.where(first, 1.0, b1)
        b2_t = jnp.where(first, 0.0, b2)
        clip = clip_value_fn(state.count) if use_clipping else None

        def normalized(g, v):
            n = g / jnp.maximum(jnp.sqrt(v), eps)
            if clip is None:
                return n
            bound = jnp.asarray(clip, n.dtype)  # a float32 bound would promote bf16 to f32
            return jnp.clip(n, -bound, bound)

        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2_t, 2)
        n = jax.tree.map(normalized, updates, state.nu)
        mu = optax.tree.update_moment(n, state.mu, b1_t, 1)
        if nesterov:
            updates = optax.tree.update_moment(n, mu, b1_t, 1)
        else:
            updates = mu
        return updates, AdamState(optax.safe_increment(state.count),
                                  optax.tree.cast_like(mu, state.mu),
                                  optax.tree.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


def adopt(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.9999,
          eps: float = 1e-6, mu_dtype: Optional[Any] = None, *, nesterov: bool = False,
          use_clipping: bool = True,
          clip_value_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
          weight_decay: float = 0.0, mask: MaskOrFn = None,
          weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """ADOPT (Taniguchi et al., 2024): step `-lr * (adopt_direction + wd * params)`.

    See `scale_by_adopt`. Equals `optax.contrib.adopt` with the same arguments (same names
    and defaults; optax has no weight decay). Weight decay here is decoupled, as the official
    code's `decouple=True` (`w <- w - lr * wd * w`); the official default adds `wd * w` to the
    gradient instead.

    Args:
      learning_rate: a number or a schedule `step -> lr` (from step 0).
      b1, b2, eps, mu_dtype, nesterov, use_clipping, clip_value_fn: see `scale_by_adopt`.
      weight_decay: decoupled weight decay coefficient, >= 0.
      mask: which leaves are decayed (None: all; a pytree of bools or a callable).
      weight_decay_mode: "lr_scaled" or "independent" (see `optim.decay_and_scale`).

    Returns:
      An `optax.GradientTransformation`.

    References:
      Taniguchi et al., `ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal
      Rate <https://arxiv.org/abs/2411.02853>`_, 2024.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine.optim.adopt import adopt
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = adopt(learning_rate=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(f"{f(params):.3f}")
      13.655
    """
    return optax.chain(
        scale_by_adopt(b1, b2, eps, mu_dtype, nesterov=nesterov, use_clipping=use_clipping,
                       clip_value_fn=clip_value_fn),
        decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
