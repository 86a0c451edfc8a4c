"""MARS-AdamW: AdamW fed a variance-reduced gradient (a scaled gradient difference added).

MARS (Make vARiance Reduction Shine) corrects each stochastic gradient with the change since
the previous step, STORM-style, before AdamW's moments see it:

    c_t = g_t + gamma * b1 / (1 - b1) * (g_t - g_{t-1}),   clipped to norm <= 1 per leaf

"MARS-approx" (the official default, and this module) uses the previous step's gradient,
taken at the previous params on another batch, so it costs no extra gradient; "exact" MARS
evaluates the old params on the new batch (twice the compute; not provided). `g_{-1} = 0`:
the first step sees `c_0 = (1 + gamma b1 / (1 - b1)) g_0`, as the official code does.

The official optimizer runs MARS on the weight matrices and AdamW (other betas, its own
learning rate and decay) on the rest (biases, norm gains); `mars` does the same, routing by
`mars_mask`.

References:
  Yuan et al., 2024, "MARS: Unleashing the Power of Variance Reduction for Training Large
  Models", https://arxiv.org/abs/2411.10438; official code: github.com/AGI-Arena/MARS
  (MARS/optimizers/mars.py).
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import (MaskOrFn, add_decoupled_weight_decay, decay_per_unit_lr,
                                mask_per_leaf, scale_by_learning_rate)
from ravine.optim.transforms import scale_by_adam


def _debiased(moment, decay, count):
    """`moment / (1 - decay**count)`, the power in float32 (a bf16 decay, as
    `optax.inject_hyperparams` may pass it, would round `1 - 0.99**t` to 0)."""
    return optax.tree.bias_correction(moment, jnp.asarray(decay, jnp.float32), count)


class MarsState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates  # EMA of the corrected gradients c
    nu: optax.Updates  # EMA of |c|^2
    last_grad: optax.Updates  # the previous step's (raw) gradient; zeros before the first


def scale_by_mars(b1: float = 0.95, b2: float = 0.99, eps: float = 1e-8,
                  gamma: float = 0.025, max_norm: Optional[float] = 1.0,
                  mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
    """The MARS-AdamW direction (no learning rate, no sign flip) on every leaf it is given.

    At step t (from 1), per leaf, with `g_0` the zeros of the initial state:

        c  = g_t + gamma * b1 / (1 - b1) * (g_t - g_{t-1})
        c  = c / max(1, |c|_F / max_norm)            (the official code: max_norm = 1)
        m  = b1 m + (1 - b1) c,      v = b2 v + (1 - b2) |c|^2
        update = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    and `g_t` is stored for the next step. The norm is the leaf's Frobenius norm (the
    official code's per-tensor `torch.norm`).

    Args:
      b1: decay of the momentum, in [0, 1) (the official default 0.95).
      b2: decay of the second moment, in [0, 1) (0.99).
      eps: added to the root of the denominator, >= 0.
      gamma: strength of the gradient correction, >= 0 (0.025; 0 gives AdamW on clipped
        gradients).
      max_norm: largest Frobenius norm of a leaf's corrected gradient, > 0, or None for no
        clipping.
      mu_dtype: dtype of `m` (default: the params' dtype); `v` and the last gradient keep
        the params' dtype.

    Returns:
      An `optax.GradientTransformation` whose state is a `MarsState`.

    References:
      Yuan et al., `MARS: Unleashing the Power of Variance Reduction for Training Large
      Models <https://arxiv.org/abs/2411.10438>`_, 2024.

    Example:
      >>> tx = optax.chain(scale_by_mars(), optax.scale(-3e-3))
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.non_negative("gamma", gamma)
    if max_norm is not None:
        _validate.greater_than("max_norm", max_norm, 0)
    mu_dtype = _validate.state_dtype("mu_dtype", mu_dtype)

    def init_fn(params):
        return MarsState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                         nu=optax.tree.zeros_like(params),
                         last_grad=optax.tree.zeros_like(params))

    def corrected(g, last):
        c = g + (gamma * b1 / (1 - b1)) * (g - last)
        if max_norm is None:
            return c
        norm = jnp.sqrt(jnp.sum((jnp.conj(c) * c).real))
        return c / jnp.maximum(norm / max_norm, 1.0)

    def update_fn(updates, state, params=None):
        del params
        c = jax.tree.map(corrected, updates, state.last_grad)
        mu = optax.tree.update_moment(c, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(c, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps),
                                 _debiased(mu, b1, count), _debiased(nu, b2, count))
        return direction, MarsState(count, optax.tree.cast_like(mu, state.mu),
                                    optax.tree.cast_like(nu, state.nu),
                                    optax.tree.cast_like(updates, state.last_grad))

    return optax.GradientTransformation(init_fn, update_fn)


def matrices(params: Any) -> Any:
    """The default `mars_mask`: True for leaves with ndim >= 2 (weight matrices, attention
    and conv kernels), False for vectors and scalars (biases, norm gains).

    Args:
      params: a pytree of arrays (or of `jax.ShapeDtypeStruct`).

    Returns:
      A pytree of bools with the structure of `params`.

    References:
      The official code's `is_grad_2d` (https://github.com/AGI-Arena/MARS), widened from
      `ndim == 2` to `ndim >= 2` (see `mars`).

    Example:
      >>> matrices({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
      {'b': False, 'w': True}
    """
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def mars(learning_rate: optax.ScalarOrSchedule, b1: float = 0.95, b2: float = 0.99,
         eps: float = 1e-8, gamma: float = 0.025, weight_decay: float = 0.0,
         mask: MaskOrFn = None, weight_decay_mode: str = "lr_scaled", *,
         max_norm: Optional[float] = 1.0, mars_mask: MaskOrFn = None,
         adam_learning_rate: Optional[optax.ScalarOrSchedule] = None, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_weight_decay: float = 0.1,
         mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
    """MARS-AdamW (Yuan et al., 2024) on the leaves chosen by `mars_mask`, AdamW on the rest.

    A leaf W routed to MARS (by default every leaf with ndim >= 2):

        W <- W - lr * (mars_direction + weight_decay * W)          (see `scale_by_mars`)

    every other leaf (vectors and scalars: biases, norm gains):

        W <- W - adam_lr * (adam(adam_b1, adam_b2, eps) + adam_weight_decay * W)

    Defaults are the official code's (`MARS(lr=3e-3, betas=(0.95, 0.99), eps=1e-8,
    weight_decay=0., gamma=0.025, optimize_1d=False, lr_1d=3e-3, betas_1d=(0.9, 0.95),
    weight_decay_1d=0.1)`: MARS-approx, with its clipping of the corrected gradient at
    norm 1). `mars_mask=lambda p: jax.tree.map(lambda _: True, p)` is its
    `optimize_1d=True`.

    Differences from the official code. It routes exactly-2-D tensors to MARS; here every
    leaf with ndim >= 2 goes (Flax attention kernels are 3-D, conv kernels 4-D: the update
    is elementwise but for the per-leaf norm, which does not depend on the shape); pass
    `mars_mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)` for its exact routing. Its
    AdamW learning rate is `lr_t * lr_1d / lr` (the schedule scaled); here
    `adam_learning_rate` is a number or a schedule of its own (None: `learning_rate`, which
    is the official default, `lr_1d == lr == 3e-3`).

    Args:
      learning_rate: MARS's learning rate, a number or a schedule `step -> lr`.
      b1, b2, eps, gamma, max_norm, mu_dtype: see `scale_by_mars` (`eps` is also the AdamW
        leaves' epsilon, as in the official code).
      weight_decay: decoupled weight decay of the MARS leaves, >= 0.
      mask: which leaves are decayed at all (None: all; a pytree of bools or a callable);
        MARS leaves take `weight_decay`, AdamW leaves `adam_weight_decay`.
      weight_decay_mode: "lr_scaled" (decay times each leaf's learning rate) or
        "independent" (`s_t * wd * W`, s_t = that learning rate / its peak); see
        `optim.decay_and_scale`.
      mars_mask: which leaves get MARS (the rest AdamW): a pytree of bools or a callable
        `params -> pytree of bools`; None (default) is `matrices` (ndim >= 2).
      adam_learning_rate: the AdamW leaves' learning rate; None means `learning_rate`.
      adam_b1, adam_b2: the AdamW leaves' moment decays, in [0, 1) (official `betas_1d`).
      adam_weight_decay: the AdamW leaves' decoupled weight decay, >= 0 (official
        `weight_decay_1d`, 0.1: it decays norm gains unless `mask` excludes them).

    Returns:
      An `optax.GradientTransformation`.

    References:
      Yuan et al., `MARS: Unleashing the Power of Variance Reduction for Training Large
      Models <https://arxiv.org/abs/2411.10438>`_, 2024.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine.optim.mars import mars
      >>> def f(p): return jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
      >>> solver = mars(learning_rate=0.1, adam_weight_decay=0.0)
      >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([1.0, -1.0])}
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(f"{f(params):.3f}")
      25.344
    """
    _validate.learning_rate(learning_rate)
    if adam_learning_rate is not None:
        _validate.learning_rate(adam_learning_rate, "adam_learning_rate")
    _validate.in_range("adam_b1", adam_b1)
    _validate.in_range("adam_b2", adam_b2)
    _validate.non_negative("adam_weight_decay", adam_weight_decay)
    if mars_mask is None:
        mars_mask = matrices

    def labels(params):
        return jax.tree.map(lambda on: "mars" if on else "adam",
                            mask_per_leaf(mars_mask, params))

    def decayed(on_mars):
        return lambda params: jax.tree.map(lambda d, on: d and on == on_mars,
                                           mask_per_leaf(mask, params),
                                           mask_per_leaf(mars_mask, params))

    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    if adam_learning_rate is None:
        scale = scale_by_learning_rate(learning_rate)
    else:
        scale = optax.partition({"mars": scale_by_learning_rate(learning_rate),
                                 "adam": scale_by_learning_rate(adam_learning_rate)}, labels)
    return optax.chain(
        optax.partition({
            "mars": scale_by_mars(b1, b2, eps, gamma, max_norm, mu_dtype),
            "adam": scale_by_adam(b1=adam_b1, b2=adam_b2, eps=eps, mu_dtype=mu_dtype),
        }, labels),
        add_decoupled_weight_decay(
            decay_per_unit_lr(learning_rate, weight_decay, weight_decay_mode), decayed(True)),
        add_decoupled_weight_decay(
            decay_per_unit_lr(adam_lr, adam_weight_decay, weight_decay_mode), decayed(False)),
        scale)
