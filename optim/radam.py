"""RAdam: Adam whose adaptive step is switched on, and scaled, by the variance of its estimate.

Early in training the second moment `v` averages few gradients, so `1/sqrt(v)` has a large
variance; Adam's usual cure is a learning-rate warmup. RAdam computes the length `rho_t` of
the simple moving average that the EMA approximates and, while it is below `threshold`, takes
a plain (bias-corrected) momentum step; afterwards it multiplies Adam's step by the
rectification `r_t` that makes the variance of the adaptive step constant.

References:
  Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
  https://arxiv.org/abs/1908.03265
"""
import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import MaskOrFn, decay_and_scale
from ravine.optim.transforms import AdamState


def scale_by_radam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                   threshold: float = 5.0) -> optax.GradientTransformation:
    """The RAdam direction (no learning rate, no sign flip), as `optax.scale_by_radam`.

    With `m`, `v` Adam's moments and `m^`, `v^` their bias corrections at step t (from 1),
    `rho_inf = 2 / (1 - b2) - 1` and `rho_t = rho_inf - 2 t b2^t / (1 - b2^t)`:

      if rho_t >= threshold:  r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf /
                                         ((rho_inf - 4)(rho_inf - 2) rho_t)),
                              update = r_t * m^ / (sqrt(v^ + eps_root) + eps)
      else:                   update = m^

    Args:
      b1, b2: decay rates of the first and second moments, in [0, 1).
      eps: added to the root of the denominator; eps_root: added inside the root.
      threshold: the smallest `rho_t` at which the adaptive step is used (the paper: 4;
        optax and PyTorch: 5).

    Returns:
      An `optax.GradientTransformation` with state `AdamState(count, mu, nu)`.

    Example:
      >>> tx = optax.chain(scale_by_radam(), optax.scale(-1e-3))
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.non_negative("eps_root", eps_root)
    _validate.non_negative("threshold", threshold)

    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def init_fn(params):
        return AdamState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params),
                         nu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        b2_t = b2 ** count.astype(jnp.float32)
        rho = rho_inf - 2.0 * count * b2_t / (1.0 - b2_t)
        adaptive = rho >= threshold
        # Below the threshold r is not used; clamping keeps the root (and its gradient) finite.
        rho_safe = jnp.where(adaptive, rho, rho_inf)
        rectification = jnp.sqrt((rho_safe - 4.0) * (rho_safe - 2.0) * rho_inf
                                 / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_safe))
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)

        def direction(m, v):
            step = rectification.astype(m.dtype) * m / (jnp.sqrt(v + eps_root) + eps)
            return jnp.where(adaptive, step, m)

        updates = jax.tree.map(direction, mu_hat, nu_hat)
        return updates, AdamState(count, optax.tree.cast_like(mu, state.mu),
                                  optax.tree.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


def radam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, eps_root: float = 0.0, threshold: float = 5.0,
          weight_decay: float = 0.0, mask: MaskOrFn = None,
          weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """RAdam (Liu et al., 2020): step `-lr * (radam_direction + wd * params)`.

    See `scale_by_radam`. Equals `optax.radam` (which has no weight decay); with
    `weight_decay > 0` it equals `optax.radam`'s direction followed by decoupled decay.

    Args:
      learning_rate: a float or a schedule `step -> lr` (from step 0).
      b1, b2, eps, eps_root, threshold: see `scale_by_radam`.
      weight_decay: decoupled weight decay coefficient (0: none).
      mask: which leaves are decayed (None: all; a pytree of bools or a callable).
      weight_decay_mode: "lr_scaled" (`w -= lr_t * wd * w`) or "independent"
        (`w -= s_t * wd * w`, s_t = lr_t / peak lr); see `optim.decay_and_scale`.

    Returns:
      An `optax.GradientTransformation`.

    References:
      https://arxiv.org/abs/1908.03265

    Example:
      >>> from ravine import optim
      >>> from ravine.optim.radam import radam
      >>> tx = radam(1e-3, weight_decay=0.01, mask=optim.decay_mask)
    """
    return optax.chain(scale_by_radam(b1, b2, eps, eps_root, threshold),
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
