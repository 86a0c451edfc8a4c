"""AdEMAMix: Adam whose numerator mixes a fast and a very slow EMA of the gradients.

Adam's single EMA (b1 ~ 0.9) forgets a gradient after ~10 steps. AdEMAMix adds a second,
slow EMA (`b3 = 0.9999`, a memory of ~10k steps), weighted by `alpha`, to the bias-corrected
fast one; the denominator is Adam's. Old gradients then keep pulling in a consistent
direction long after Adam would have dropped them. Because the slow EMA is meaningless at
the start, the paper warms `alpha` and `b3` up over the run (`alpha_schedule`,
`b3_schedule`); with constants, use a smaller `b3` (0.999) for short runs.

References:
  Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
  https://arxiv.org/abs/2409.03137
"""
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import MaskOrFn, decay_and_scale


class AdemamixState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken (b3 and alpha schedules are read at it)
    m1: optax.Updates  # fast EMA of the gradients (decay b1)
    m2: optax.Updates  # slow EMA of the gradients (decay b3)
    nu: optax.Updates  # EMA of the squared gradients (decay b2)


def _debiased(moment, decay, count):
    """`moment / (1 - decay**count)`, the power in float32 (a bf16 decay, as
    `optax.inject_hyperparams` may pass it, would round `1 - 0.999**t` to 0)."""
    return optax.tree.bias_correction(moment, jnp.asarray(decay, jnp.float32), count)


def _check_scalar_or_schedule(name, value, check):
    if not callable(value):
        check(name, value)


def scale_by_ademamix(b1: float = 0.9, b2: float = 0.999,
                      b3: optax.ScalarOrSchedule = 0.9999,
                      alpha: optax.ScalarOrSchedule = 6.0, eps: float = 1e-8,
                      eps_root: float = 0.0,
                      mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
    """The AdEMAMix direction (no learning rate, no sign flip), as
    `optax.contrib.scale_by_ademamix`.

    At step t (from 1), with `b3_t`, `alpha_t` the (scheduled) values at step t - 1:

        m1 <- b1 m1 + (1 - b1) g          m2 <- b3_t m2 + (1 - b3_t) g
        v  <- b2 v + (1 - b2) |g|^2
        update = (m1 / (1 - b1^t) + alpha_t * m2) / (sqrt(v / (1 - b2^t) + eps_root) + eps)

    The slow EMA `m2` is not bias-corrected (as in the paper). The default `alpha` is
    optax's for this transform (6.0); the full optimizer `ademamix` defaults to 5.0, also
    as optax.

    Args:
      b1: decay of the fast EMA, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the slow EMA, in [0, 1), or a schedule `step -> b3` (`b3_schedule`).
      alpha: weight of the slow EMA, >= 0, or a schedule `step -> alpha`
        (`alpha_schedule`).
      eps: added to the root of the denominator, >= 0; eps_root: added inside it, >= 0.
      mu_dtype: dtype of both EMAs `m1`, `m2` (default: the params' dtype); `v` keeps the
        params' dtype.

    Returns:
      An `optax.GradientTransformation` whose state is an `AdemamixState`.

    References:
      Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
      <https://arxiv.org/abs/2409.03137>`_, 2024.

    Example:
      >>> tx = optax.chain(scale_by_ademamix(b3=0.999, alpha=5.0), optax.scale(-1e-3))
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _check_scalar_or_schedule("b3", b3, _validate.in_range)
    _check_scalar_or_schedule("alpha", alpha, _validate.non_negative)
    _validate.non_negative("eps", eps)
    _validate.non_negative("eps_root", eps_root)
    mu_dtype = _validate.state_dtype("mu_dtype", mu_dtype)

    def init_fn(params):
        return AdemamixState(count=jnp.zeros([], jnp.int32),
                             m1=optax.tree.zeros_like(params, dtype=mu_dtype),
                             m2=optax.tree.zeros_like(params, dtype=mu_dtype),
                             nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        b3_t = b3(state.count) if callable(b3) else b3
        alpha_t = alpha(state.count) if callable(alpha) else alpha
        m1 = optax.tree.update_moment(updates, state.m1, b1, 1)
        m2 = optax.tree.update_moment(updates, state.m2, b3_t, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        m1_hat = _debiased(m1, b1, count)
        nu_hat = _debiased(nu, b2, count)
        updates = jax.tree.map(
            lambda m, s, v: (m + alpha_t * s) / (jnp.sqrt(v + eps_root) + eps),
            m1_hat, m2, nu_hat)
        return updates, AdemamixState(count, optax.tree.cast_like(m1, state.m1),
                                      optax.tree.cast_like(m2, state.m2),
                                      optax.tree.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


def ademamix(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             b3: optax.ScalarOrSchedule = 0.9999, alpha: optax.ScalarOrSchedule = 5.0,
             eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None,
             weight_decay: float = 0.0, mask: MaskOrFn = None,
             weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """AdEMAMix (Pagliardini et al., 2024): step `-lr * (ademamix_direction + wd * params)`.

    See `scale_by_ademamix` for the direction. Equals `optax.contrib.ademamix` with the same
    arguments (same names and defaults).

    Args:
      learning_rate: a number or a schedule `step -> lr` (from step 0).
      b1, b2, b3, alpha, eps, eps_root, mu_dtype: see `scale_by_ademamix`; `b3` and
        `alpha` may be schedules (the paper warms both up: `b3_schedule`,
        `alpha_schedule`).
      weight_decay: decoupled weight decay coefficient, >= 0.
      mask: which leaves are decayed (None: all; a pytree of bools or a callable).
      weight_decay_mode: "lr_scaled" (`w -= lr_t * wd * w`, optax's) or "independent"
        (`w -= s_t * wd * w`, s_t = lr_t / peak lr); see `optim.decay_and_scale`.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
      <https://arxiv.org/abs/2409.03137>`_, 2024.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine.optim.ademamix import ademamix
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = ademamix(learning_rate=0.01)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(f"{f(params):.3f}")
      13.642
    """
    return optax.chain(
        scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype),
        decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))


def alpha_schedule(alpha: float, warmup_steps: int) -> optax.Schedule:
    """The paper's warmup of `alpha`: `alpha_t = min(t * alpha / warmup_steps, alpha)`.

    Args:
      alpha: the final weight of the slow EMA, >= 0.
      warmup_steps: steps to reach it (the paper: the whole run), >= 1.

    Returns:
      A schedule `step -> alpha_t` for `ademamix(alpha=...)`.

    References:
      Pagliardini et al., https://arxiv.org/abs/2409.03137, Section 3 and Appendix.

    Example:
      >>> tx = ademamix(1e-3, alpha=alpha_schedule(5.0, 10_000),
      ...               b3=b3_schedule(0.9, 0.9999, 10_000))
    """
    _validate.non_negative("alpha", alpha)
    _validate.positive_int("warmup_steps", warmup_steps)

    def schedule(step):
        return jnp.minimum(jnp.asarray(step, jnp.float32) * alpha / warmup_steps, alpha)

    return schedule


def b3_schedule(b1: float, b3: float, warmup_steps: int) -> optax.Schedule:
    """The paper's warmup of `b3` from `b1`: the EMA's half-life grows linearly in t.

        b3_t = min(exp(ln(b1) ln(b3) / ((1 - t/T) ln(b3) + (t/T) ln(b1))), b3),  T = warmup_steps

    so `b3_0 = b1` and `b3_T = b3`, with `1 / ln(b3_t)` (the EMA's time scale) linear in t.

    Args:
      b1: the starting decay (AdEMAMix's fast decay), in (0, 1).
      b3: the final decay, in (0, 1).
      warmup_steps: steps to reach it, >= 1.

    Returns:
      A schedule `step -> b3_t` for `ademamix(b3=...)`.

    References:
      Pagliardini et al., https://arxiv.org/abs/2409.03137, Section 3 and Appendix.
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b3", b3)
    if b1 == 0 or b3 == 0:
        raise ValueError(f"b3_schedule needs b1 and b3 in (0, 1), got b1={b1!r}, b3={b3!r}")
    _validate.positive_int("warmup_steps", warmup_steps)
    log_b1, log_b3 = math.log(b1), math.log(b3)

    def schedule(step):
        frac = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
        log_t = log_b1 * log_b3 / ((1.0 - frac) * log_b3 + frac * log_b1)
        return jnp.minimum(jnp.exp(log_t), b3)

    return schedule
