"""Sophia: momentum divided by an EMA of a diagonal Hessian estimate, clipped per coordinate.

    m_t = b1 m_{t-1} + (1 - b1) g_t                       (no bias correction)
    h_t = b2 h_{t-k} + (1 - b2) h^_t   on refresh steps, else h_t = h_{t-1}
    step = -lr * (sign(m_t) * min(|m_t| / (rho * max(h_t, 0) + eps), 1) + wd * params)

as the official SophiaG code (Liuhong99/Sophia, `sophia.py`), with its defaults b1=0.965,
b2=0.99, rho=0.04, eps=1e-15, weight_decay=0.1 (decoupled, times lr). The estimate `h^`
comes from outside through Optax's extra-args interface, so the transform stays a pure
function of its inputs:

    updates, state = tx.update(grads, state, params, hessian_diag=estimate)  # fold it in
    updates, state = tx.update(grads, state, params)                         # keep h
    updates, state = tx.update(grads, state, params, hessian_fn=fn)  # fn(params) -> estimate,
                                         # called (in a lax.cond) only on refresh steps
    updates, state = tx.update(grads, state, params, obj_fn=loss)  # optax's interface:
                                         # loss(params) -> scalar; Hutchinson's estimate
                                         # of its Hessian, on refresh steps

Give at most one of the three. Other extra arguments are passed over, as every optax
transform does (an `optax.chain` hands each extra argument to all its transforms), except
a name that looks like a misspelt one of these three (`hessian`, `obj_func`, `loss_fn`,
...): that raises TypeError rather than leave the estimate at 0 for good.

Refresh steps are the steps `t` (from 0) with `t % hessian_every == 0`, as the paper's
Algorithm 3 (t mod k = 1, counting from 1): the first step already has an estimate. The
estimate is folded in before the step it is given at, so it is used at once. (The official
training loop refreshes after steps k-1, 2k-1, ..., at the updated params: the same
schedule shifted by one step, with sign(m) steps until the first refresh. Pass
`hessian_diag` yourself to follow it.)

The estimators are in `optim.sophia_estimates`: Gauss-Newton-Bartlett (Sophia-G, the default
and the official code's) and Hutchinson (Sophia-H). With GNB the estimate is already scaled
by the number of tokens (the official code multiplies by `bs = total_bs * block_size` at
use); the `max(h, 0)` only matters for Hutchinson's estimates, which can be negative
(the official SophiaH takes `relu(h)` there too).

Compared with `optax.contrib.sophia` (which follows levanter's Sophia-H):
  - defaults: the official SophiaG's, weight_decay=0.1 and rho=0.04 (optax: 1e-4 and
    gamma=0.01, gamma being optax's name for rho) and eps=1e-15 (optax: 1e-8); pass optax's
    values to get its optimizer (its Rosenbrock test needs them: at the official ones the
    decay holds the iterate at about [0.56, 0.32] instead of [1, 1]);
  - names: `gamma` and `update_interval` are accepted for `rho` and `hessian_every`;
    `obj_fn` in `update` as optax's (Hutchinson's estimate with Rademacher probes);
  - m is not bias-corrected (optax divides it by 1 - b1^t), the ratio is
    |m| / (rho * max(h, 0) + eps) (optax: m / max(gamma * h, eps)), and an estimate is used
    at the step it is taken at (optax: from the next step on);
  - the probes for `obj_fn` come from `fold_in(key(seed), step)`, not from a key in the
    state: the same numbers after a restart from any step.

References:
  Liu et al., 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
  Pre-training", https://arxiv.org/abs/2305.14342
"""
import difflib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ravine.optim import _validate, sophia_estimates
from ravine.optim.alias import MaskOrFn, decay_and_scale

ESTIMATORS = ("gnb", "hutchinson")
# The ways to hand `update` a Hessian estimate (see the module docstring).
HESSIAN_ARGUMENTS = ("hessian_diag", "hessian_fn", "obj_fn")


def _reject_misspelt_hessian_arguments(extra_args):
    """TypeError for an extra argument that looks meant for Sophia but is not one of its
    names: passed over, it would leave the Hessian estimate at 0 without a word."""
    for name in extra_args:
        near = difflib.get_close_matches(name, HESSIAN_ARGUMENTS, n=1, cutoff=0.6)
        if near or "hess" in name.lower():
            raise TypeError(
                f"sophia's update got an unexpected keyword argument {name!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; its Hessian estimate comes as one of {list(HESSIAN_ARGUMENTS)}")


def _alias(name, value, default, optax_name, optax_value):
    """`value`, or `optax_value` (optax's name for the argument) when that is given; both
    given, with `value` not at its default, must agree."""
    if optax_value is None:
        return value
    if not isinstance(value, jax.core.Tracer) and not isinstance(optax_value, jax.core.Tracer):
        given = np.asarray(value, np.float64)  # injected values are float32 arrays
        if not np.isclose(given, [default, np.asarray(optax_value, np.float64)],
                          rtol=1e-6, atol=0).any():
            raise ValueError(f"give {name} or {optax_name} (optax's name for it), not both: "
                             f"got {name}={value!r} and {optax_name}={optax_value!r}")
    return optax_value


class SophiaState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates  # momentum m
    hessian: optax.Updates  # EMA h of the diagonal Hessian estimates


def scale_by_sophia(b1: float = 0.965, b2: float = 0.99, rho: float = 0.04, eps: float = 1e-15,
                    hessian_every: int = 10, *, seed: int = 0, gamma: Optional[float] = None,
                    update_interval: Optional[int] = None
                    ) -> optax.GradientTransformationExtraArgs:
    """The Sophia direction `sign(m) * min(|m| / (rho * max(h, 0) + eps), 1)`.

    Args:
      b1: momentum decay, in [0, 1). b2: decay of the Hessian EMA (per refresh), in [0, 1).
      rho: the clipping scale (the official code's `rho`; the paper's and optax's gamma).
      eps: keeps the ratio finite where h is 0 (there the step is sign(m)).
      hessian_every: refresh interval k, used when the estimate comes as `hessian_fn` or
        `obj_fn`.
      seed: seed of the Rademacher probes of the estimate from `obj_fn` (the key of step t
        is `fold_in(key(seed), t)`).
      gamma, update_interval: `optax.contrib.sophia`'s names for `rho` and `hessian_every`
        (give one of each pair).

    Returns:
      An `optax.GradientTransformationExtraArgs`; `update(grads, state, params,
      hessian_diag=None, hessian_fn=None, obj_fn=None)` (see the module docstring).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from ravine.optim.sophia import scale_by_sophia
      >>> tx = optax.chain(scale_by_sophia(), optax.scale(-1e-4))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([0.4, 0.4])}
      >>> estimate = {"w": jnp.array([100.0, 0.0])}  # e.g. from optim.sophia_estimates.gnb
      >>> updates, state = tx.update(grads, state, params, hessian_diag=estimate)
      >>> [round(float(u) / 1e-4, 3) for u in updates["w"]]  # in units of lr; 1 where h = 0
      [-0.35, -1.0]
    """
    rho = _alias("rho", rho, 0.04, "gamma", gamma)
    hessian_every = _alias("hessian_every", hessian_every, 10, "update_interval",
                           update_interval)
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("rho", rho)
    _validate.non_negative("eps", eps)
    _validate.positive_int("hessian_every", hessian_every)

    def init_fn(params):
        return SophiaState(count=jnp.zeros([], jnp.int32),
                           mu=optax.tree.zeros_like(params),
                           hessian=optax.tree.zeros_like(params))

    def fold(hessian, estimate):
        new = optax.tree.update_moment(estimate, hessian, b2, 1)
        return optax.tree.cast_like(new, hessian)

    def update_fn(updates, state, params=None, hessian_diag=None, hessian_fn=None,
                  obj_fn=None, **extra_args):
        _reject_misspelt_hessian_arguments(extra_args)
        given = [name for name, value in zip(HESSIAN_ARGUMENTS,
                                             (hessian_diag, hessian_fn, obj_fn))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f"give sophia's update one of {list(HESSIAN_ARGUMENTS)}, got "
                             f"{given}")
        if obj_fn is not None:
            def hessian_fn(params):  # optax's default estimator, Hutchinson's
                key = jax.random.fold_in(jax.random.key(seed), state.count)
                return sophia_estimates.hutchinson(obj_fn, params, key)
        hessian = state.hessian
        if hessian_diag is not None:
            hessian = fold(hessian, hessian_diag)
        elif hessian_fn is not None:
            if params is None:
                raise ValueError(f"sophia's update needs params to call {given[0]}")
            hessian = jax.lax.cond(state.count % hessian_every == 0,
                                   lambda h: fold(h, hessian_fn(params)), lambda h: h,
                                   hessian)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)

        def direction(m, h):
            ratio = jnp.abs(m) / (rho * jnp.maximum(h, 0) + eps)
            return jnp.sign(m) * jnp.minimum(ratio, 1)

        updates = jax.tree.map(direction, mu, hessian)
        return updates, SophiaState(optax.safe_increment(state.count),
                                    optax.tree.cast_like(mu, state.mu), hessian)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia(learning_rate: optax.ScalarOrSchedule, b1: float = 0.965, b2: float = 0.99,
           rho: float = 0.04, eps: float = 1e-15, weight_decay: float = 0.1,
           hessian_every: int = 10, estimator: str = "gnb", mask: MaskOrFn = None,
           weight_decay_mode: str = "lr_scaled", *, seed: int = 0,
           gamma: Optional[float] = None, update_interval: Optional[int] = None
           ) -> optax.GradientTransformationExtraArgs:
    """Sophia (Liu et al., 2023): clipped, diagonally preconditioned momentum; see the module.

    Defaults are the official SophiaG code's; `optax.contrib.sophia`'s differ (see the
    module): weight_decay 1e-4 (here 0.1), gamma = rho 0.01 (here 0.04), eps 1e-8 (here
    1e-15). `sophia(lr, weight_decay=1e-4, gamma=0.01, eps=1e-8)` is optax's setting.

    Args:
      learning_rate: a float or a schedule `step -> lr` (the official code: 1e-4 peak for
        GPT-2 small with rho=0.05, weight_decay=0.2).
      b1, b2, rho, eps, hessian_every, seed: see `scale_by_sophia`.
      weight_decay: decoupled decay times lr, as the official `param.mul_(1 - lr * wd)`;
        mask: which leaves are decayed.
      estimator: "gnb" (Sophia-G) or "hutchinson" (Sophia-H): which estimator the training
        loop should feed (`optim.sophia_estimates`); the transform itself takes any, and an
        `obj_fn` (a scalar loss) always gets Hutchinson's.
      weight_decay_mode: "lr_scaled" (`w -= lr_t * wd * w`) or "independent"
        (`w -= s_t * wd * w`, s_t = lr_t / peak lr); see `optim.decay_and_scale`.
      gamma, update_interval: optax's names for `rho` and `hessian_every`.

    Returns:
      An `optax.GradientTransformationExtraArgs` taking `hessian_diag=`, `hessian_fn=` or
      `obj_fn=` (optax's).

    References:
      https://arxiv.org/abs/2305.14342; https://github.com/Liuhong99/Sophia

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ravine.optim import sophia_estimates
      >>> from ravine.optim.sophia import sophia
      >>> def logits_fn(p, x): return x @ p["w"]  # a linear model: 3 features, 4 classes
      >>> params, inputs = {"w": jnp.zeros((3, 4))}, jnp.ones((2, 3))
      >>> grads, key = {"w": jnp.ones((3, 4))}, jax.random.key(0)
      >>> tx = sophia(1e-4)
      >>> state = tx.init(params)
      >>> fn = lambda p: sophia_estimates.gnb(logits_fn, p, inputs, key)
      >>> updates, state = tx.update(grads, state, params, hessian_fn=fn)
      >>> updates["w"].shape
      (3, 4)
    """
    _validate.one_of("estimator", estimator, ESTIMATORS)
    return optax.chain(scale_by_sophia(b1, b2, rho, eps, hessian_every, seed=seed, gamma=gamma,
                                       update_interval=update_interval),
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
