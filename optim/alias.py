"""First-order optimizers: each is `chain(scale_by_*, weight decay, learning rate)`.

`learning_rate` is a float or a schedule `step -> lr` (evaluated at the optimizer's own step,
from 0). `mask` chooses the leaves that get weight decay: None (all), a pytree of bools, or a
callable `params -> pytree of bools` such as `decay_mask`.

Weight decay is decoupled (Loshchilov & Hutter) and comes in two modes, chosen by
`weight_decay_mode`:

* `"lr_scaled"` (default, optax's): `w <- w - lr_t * (direction + weight_decay * w)`.
* `"independent"`: `w <- w - lr_t * direction - s_t * weight_decay * w`, where
  `s_t = lr_t / peak_lr` is the schedule's multiplier (1 for a constant learning rate): the
  decay follows the schedule's shape but not the learning rate's size, `w <- (1 - λ) w - η g`
  for a constant lr (Loshchilov & Hutter's formulation; Wortsman et al. 2023).

`decay_and_scale` builds that last part of every chain; Shampoo, SOAP and Muon use the same
helpers (`scale_by_learning_rate`, `add_decoupled_weight_decay`) or `decay_and_scale` itself.
"""
from typing import Any, Callable, Optional, Union

import jax
import optax

from ravine.optim import _validate
from ravine.optim.transforms import (scale_by_adafactor, scale_by_adagrad, scale_by_adam,
                              scale_by_lion, scale_by_momentum, scale_by_rms)

ScalarOrSchedule = Union[float, optax.Schedule]
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def mask_per_leaf(spec: MaskOrFn, params: optax.Params) -> Any:
    """A mask (None: all True; a pytree of bools, possibly a prefix of `params`; or a
    callable `params -> such a pytree`) as one Python bool per leaf of `params`, for
    optimizers that route leaves in Python (MARS's and AdamSAGE's branches)."""
    if spec is None:
        return jax.tree.map(lambda _: True, params)
    tree = spec(params) if callable(spec) else spec
    return jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub),
                        tree, params)
WEIGHT_DECAY_MODES = ("lr_scaled", "independent")


def _is_python_zero(value):
    # Only a Python number can drop work: under `optax.inject_hyperparams` values arrive as
    # (possibly traced) arrays, and init and update must then build the same chain.
    return isinstance(value, (int, float)) and value == 0


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> optax.GradientTransformation:
    """Multiplies updates by `-learning_rate` (a float, or a schedule `step -> lr`).

    A schedule is evaluated at the transform's own step counter, starting at 0.

    Args:
      learning_rate: a non-negative number or a schedule.

    Returns:
      An `optax.GradientTransformation` (`optax.scale_by_learning_rate`).
    """
    _validate.learning_rate(learning_rate)
    return optax.scale_by_learning_rate(learning_rate)


def add_decoupled_weight_decay(weight_decay: ScalarOrSchedule,
                               mask: MaskOrFn = None) -> optax.GradientTransformation:
    """Adds `weight_decay * params` to the updates (`optax.add_decayed_weights`).

    Placed before `scale_by_learning_rate`, the step becomes `-lr * (direction + wd * params)`.

    Args:
      weight_decay: the decay coefficient, a number >= 0 or a schedule `step -> coefficient`.
        A Python 0 does no work and returns the updates unchanged, with the same (empty) state
        a nonzero value has, so `optax.inject_hyperparams` builds the same chain either way.
      mask: None (decay every leaf), a pytree of bools, or a callable `params -> pytree of
        bools` choosing which leaves are decayed.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    if not callable(weight_decay):
        _validate.non_negative("weight_decay", weight_decay)
    decay = optax.add_decayed_weights(weight_decay, mask)
    if not _is_python_zero(weight_decay):
        return decay

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(decay.init, update_fn)


def peak_learning_rate(learning_rate: ScalarOrSchedule) -> float:
    """The peak of a learning rate: the number itself, or a schedule's `peak_value` attribute.

    `optim.schedules` set `peak_value` on the schedules they return; on any other callable
    set it by hand (`schedule.peak_value = 3e-4`).

    Args:
      learning_rate: a positive number or a schedule with a `peak_value` attribute.

    Returns:
      The peak learning rate (> 0).

    Raises:
      ValueError: for an array (`optax.inject_hyperparams` passes the learning rate, or a
        schedule's value, as an array each step: the peak cannot be known), a schedule without
        `peak_value`, or a peak that is not > 0.
    """
    if callable(learning_rate):
        peak = getattr(learning_rate, "peak_value", None)
        if peak is None:
            raise ValueError(
                f"learning_rate: weight_decay_mode='independent' needs the schedule's peak "
                f"(s_t = lr_t / peak), and {learning_rate!r} has no peak_value attribute; use "
                f"an optim.schedules schedule or set schedule.peak_value")
    elif isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
        peak = learning_rate
    else:
        raise ValueError(
            f"learning_rate: weight_decay_mode='independent' needs the peak learning rate, "
            f"got an array {learning_rate!r}; with optax.inject_hyperparams pass "
            f"static_args=('learning_rate',)")
    _validate.greater_than("peak learning_rate", peak, 0)
    return peak


def decay_and_scale(learning_rate: ScalarOrSchedule, weight_decay: float = 0.0,
                    mask: MaskOrFn = None,
                    weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """Decoupled weight decay and the learning rate: turns a direction `d` into the step.

    `"lr_scaled"`: step `-lr_t * (d + weight_decay * w)` (optax's `add_decayed_weights`
    then `scale_by_learning_rate`). `"independent"`: step `-lr_t * d - s_t * weight_decay * w`
    with `s_t = lr_t / peak_lr`, computed as `-lr_t * (d + (weight_decay / peak_lr) * w)`:
    the same chain with the coefficient divided by the peak, so both modes have the same state.

    Args:
      learning_rate: a number or a schedule; in "independent" mode its peak must be known
        (a number, or a schedule with a `peak_value` attribute, see `peak_learning_rate`).
      weight_decay: the decay coefficient, >= 0 (0: no decay, no work).
      mask: which leaves are decayed (see `add_decoupled_weight_decay`).
      weight_decay_mode: "lr_scaled" or "independent".

    Returns:
      An `optax.GradientTransformation` (a chain of the decay and the learning rate).

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.

      Wortsman et al., `Small-scale proxies for large-scale Transformer training
      instabilities <https://arxiv.org/abs/2309.14322>`_, 2023.

    Examples:
      With a constant learning rate, "independent" gives `w <- (1 - λ) w - η g`:

      >>> import jax.numpy as jnp
      >>> from ravine import optim
      >>> tx = optim.decay_and_scale(0.1, weight_decay=0.5, weight_decay_mode="independent")
      >>> w, g = jnp.array([2.0]), jnp.array([1.0])
      >>> updates, _ = tx.update(g, tx.init(w), w)
      >>> print(w + updates)  # (1 - 0.5) * 2 - 0.1 * 1
      [0.9]
    """
    return optax.chain(
        add_decoupled_weight_decay(decay_per_unit_lr(learning_rate, weight_decay,
                                                      weight_decay_mode), mask),
        scale_by_learning_rate(learning_rate))


def decay_per_unit_lr(learning_rate: ScalarOrSchedule, weight_decay: float,
                      weight_decay_mode: str) -> float:
    """The coefficient c such that the decay term of the step is `lr_t * c * w`."""
    _validate.one_of("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
    _validate.non_negative("weight_decay", weight_decay)
    if weight_decay_mode == "lr_scaled" or _is_python_zero(weight_decay):
        return weight_decay
    return weight_decay / peak_learning_rate(learning_rate)


def decay_mask(params: Any) -> Any:
    """True for leaves with ndim >= 2: decay weight matrices and kernels, not biases or scales.

    Args:
      params: a pytree of arrays (or of `jax.ShapeDtypeStruct`).

    Returns:
      A pytree of bools with the structure of `params`.
    """
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def sgd(learning_rate: ScalarOrSchedule, momentum: Optional[float] = 0.0,
        nesterov: bool = False, weight_decay: float = 0.0, mask: MaskOrFn = None,
        accumulator_dtype: Optional[Any] = None,
        weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """SGD with optional heavy-ball / Nesterov momentum and decoupled weight decay.

    `m_t = g_t + momentum * m_{t-1}`; step `-lr * (m_t + wd * params)` (Nesterov: `m_t` is
    replaced by `g_t + momentum * m_t`). Equals `optax.sgd`, with `optax.add_decayed_weights`
    between momentum and learning rate when weight_decay > 0.

    Args:
      learning_rate: a number or a schedule `step -> lr`.
      momentum: momentum coefficient in [0, 1), or None for no momentum buffer. As in
        optax, any number, 0 included, keeps a buffer; the default is 0.0 (ravine's
        documented signature), so pass None to save the buffer's memory. (A Python 0 that
        dropped the buffer would give a state unlike `inject_hyperparams`', whose 0 is an
        array.)
      nesterov: use Nesterov's momentum.
      weight_decay: decoupled weight decay coefficient, >= 0.
      mask: which leaves are decayed (None: all).
      accumulator_dtype: dtype of the momentum buffer (default: the params' dtype).
      weight_decay_mode: "lr_scaled" or "independent" (see `decay_and_scale`).

    Returns:
      An `optax.GradientTransformation`.

    References:
      Robbins & Monro, `A Stochastic Approximation Method
      <https://doi.org/10.1214/aoms/1177729586>`_, 1951.

      Sutskever et al., `On the importance of initialization and momentum in deep learning
      <https://proceedings.mlr.press/v28/sutskever13.html>`_, 2013.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.sgd(learning_rate=0.1, momentum=0.9)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f"{f(params):.3f}")
      8.960
      2.962
      0.054
    """
    if momentum is None:
        _validate.state_dtype("accumulator_dtype", accumulator_dtype)
        direction = optax.identity()
    else:
        _validate.in_range("momentum", momentum)
        direction = scale_by_momentum(momentum, nesterov, accumulator_dtype)
    return optax.chain(direction,
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))


def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1,
            eps: float = 1e-7) -> optax.GradientTransformation:
    """AdaGrad: step `-lr * g_t / sqrt(sum_{s<=t} |g_s|^2 + eps)`.

    See `scale_by_adagrad`; equals `optax.adagrad`.

    Args:
      learning_rate: a number or a schedule `step -> lr`.
      initial_accumulator_value: starting value of the sum of squares, >= 0.
      eps: added inside the root, >= 0.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Duchi et al., `Adaptive Subgradient Methods for Online Learning and Stochastic
      Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.adagrad(learning_rate=1.0)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f"{f(params):.3f}")
      5.012
      2.403
      1.255
    """
    return optax.chain(scale_by_adagrad(initial_accumulator_value, eps),
                       scale_by_learning_rate(learning_rate))


def rmsprop(learning_rate: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8,
            momentum: Optional[float] = 0.0, nesterov: bool = False, centered: bool = False,
            bias_correction: bool = False, initial_scale: float = 0.0,
            eps_in_sqrt: bool = True) -> optax.GradientTransformation:
    """RMSProp: step `-lr * g_t / sqrt(v_t + eps)`, then momentum.

    `v_t` is the EMA of `|g|^2` (see `scale_by_rms`); centered, the EMA of `g` is subtracted
    (a running variance). As in `optax.rmsprop` (and TensorFlow), momentum accumulates the
    lr-scaled steps, so it comes after the learning rate here. Equals `optax.rmsprop`.

    Args:
      learning_rate: a number or a schedule `step -> lr`.
      decay: decay rate of the moving averages, in [0, 1).
      eps: added to the denominator, >= 0.
      momentum: momentum coefficient in [0, 1), or None for no momentum buffer. As in
        optax, any number, 0 included, keeps a buffer; the default is 0.0 (ravine's
        documented signature), so pass None to save the buffer's memory. (A Python 0 that
        dropped the buffer would give a state unlike `inject_hyperparams`', whose 0 is an
        array.)
      nesterov: use Nesterov's momentum.
      centered: divide by the standard deviation of recent gradients instead of their RMS.
      bias_correction: divide the moving averages by `1 - decay^t`.
      initial_scale: initial value of `v`, >= 0.
      eps_in_sqrt: add `eps` inside the root (optax's default) or outside it (PyTorch's).

    Returns:
      An `optax.GradientTransformation`.

    References:
      Tieleman & Hinton, `Lecture 6.5: rmsprop
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_, 2012.

      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.rmsprop(learning_rate=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f"{f(params):.3f}")
      10.505
      8.506
      7.101
    """
    if momentum is None:
        momentum_tx = optax.identity()
    else:
        _validate.in_range("momentum", momentum)
        momentum_tx = scale_by_momentum(momentum, nesterov)
    return optax.chain(
        scale_by_rms(decay, eps, initial_scale, eps_in_sqrt, bias_correction, centered),
        scale_by_learning_rate(learning_rate),
        momentum_tx)


def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, eps_root: float = 0.0, mu_dtype: Optional[Any] = None, *,
         nesterov: bool = False) -> optax.GradientTransformation:
    """Adam: step `-lr * m^_t / (sqrt(v^_t + eps_root) + eps)`.

    `m^`, `v^` are the bias-corrected moments (see `scale_by_adam`); with `nesterov`, NAdam's
    look-ahead first moment. Equals `optax.adam` (`optax.nadam` with nesterov).

    Args:
      learning_rate: a number or a schedule `step -> lr`.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: added to the root of the denominator, >= 0.
      eps_root: added inside the root, >= 0.
      mu_dtype: dtype of the first moment (default: the params' dtype).
      nesterov: use Nesterov's momentum (NAdam).

    Returns:
      An `optax.GradientTransformation`.

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015.

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.adam(learning_rate=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f"{f(params):.3f}")
      12.830
      11.722
      10.676
    """
    return optax.chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
                       scale_by_learning_rate(learning_rate))


def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 1e-4, mask: MaskOrFn = None,
          eps_root: float = 0.0, mu_dtype: Optional[Any] = None, nesterov: bool = False,
          weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """AdamW: step `-lr * (adam_direction + wd * params)` (lr-scaled decay, the default).

    Equals `optax.adamw` (`optax.nadamw` with nesterov). With
    `weight_decay_mode="independent"` the decay term is `-s_t * wd * params` instead
    (see `decay_and_scale`).

    Args:
      learning_rate: a number or a schedule `step -> lr`.
      b1: decay rate of the first moment, in [0, 1).
      b2: decay rate of the second moment, in [0, 1).
      eps: added to the root of the denominator, >= 0.
      weight_decay: decoupled weight decay coefficient, >= 0.
      mask: which leaves are decayed (None: all).
      eps_root: added inside the root, >= 0.
      mu_dtype: dtype of the first moment (default: the params' dtype).
      nesterov: use Nesterov's momentum (NAdamW).
      weight_decay_mode: "lr_scaled" or "independent".

    Returns:
      An `optax.GradientTransformation`.

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.

      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.adamw(learning_rate=0.1, weight_decay=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f"{f(params):.3f}")
      12.563
      11.229
      9.995
    """
    return optax.chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))


def lion(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
         weight_decay: float = 1e-3, mask: MaskOrFn = None, mu_dtype: Optional[Any] = None,
         weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """Lion: step `-lr * (sign(b1 m + (1-b1) g) + wd * params)`, then `m <- b2 m + (1-b2) g`.

    See `scale_by_lion`; equals `optax.lion`. Lion's steps have unit size per coordinate:
    use a learning rate 3-10x smaller than AdamW's.

    Args:
      learning_rate: a number or a schedule `step -> lr`.
      b1: interpolation between momentum and gradient for the update, in [0, 1).
      b2: decay rate of the momentum, in [0, 1).
      weight_decay: decoupled weight decay coefficient, >= 0.
      mask: which leaves are decayed (None: all).
      mu_dtype: dtype of the momentum (default: the params' dtype).
      weight_decay_mode: "lr_scaled" or "independent" (see `decay_and_scale`).

    Returns:
      An `optax.GradientTransformation`.

    References:
      Chen et al., `Symbolic Discovery of Optimization Algorithms
      <https://arxiv.org/abs/2302.06675>`_, 2023.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.lion(learning_rate=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f"{f(params):.3f}")
      12.827
      11.715
      10.663
    """
    return optax.chain(scale_by_lion(b1, b2, mu_dtype),
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))


def adafactor(learning_rate: Optional[ScalarOrSchedule] = None,
              min_dim_size_to_factor: int = 128, decay_rate: float = 0.8,
              decay_offset: int = 0, multiply_by_parameter_scale: bool = True,
              clipping_threshold: Optional[float] = 1.0, eps: float = 1e-30,
              weight_decay: float = 0.0, mask: MaskOrFn = None,
              momentum: Optional[float] = None, dtype_momentum: Any = "float32",
              weight_decay_rate: Optional[ScalarOrSchedule] = None,
              weight_decay_mask: MaskOrFn = None, factored: bool = True,
              weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """Adafactor: factored second moments, update clipping, relative step size.

    As `optax.adafactor`, and equal to it for its arguments: `u` from `scale_by_adafactor`,
    times the learning rate (None: 1), then optax's momentum (an EMA of the lr-scaled steps,
    without debiasing), then weight decay, then the sign flip. Weight decay comes in two
    spellings:

    * `weight_decay` (ravine's): the decay term is `lr_t * weight_decay * w` ("lr_scaled",
      decoupled as in `adamw`) or `s_t * weight_decay * w` ("independent", see
      `decay_and_scale`);
    * `weight_decay_rate` (optax's): the decay term is `weight_decay_rate * w`, not multiplied
      by the learning rate. For a constant learning rate this is `weight_decay` with
      `weight_decay_mode="independent"`; with a schedule, optax's rate stays constant while
      independent mode follows the schedule's multiplier `s_t`.

    Args:
      learning_rate: a number, a schedule, or None (no scaling: Adafactor's relative steps).
      min_dim_size_to_factor: factor a leaf only when its two largest dims are at least this
        (a static Python int; with `optax.inject_hyperparams` list it in `static_args`).
      decay_rate: exponent of the second moment's decay schedule, >= 0.
      decay_offset: step offset of that schedule, an integer >= 0.
      multiply_by_parameter_scale: scale updates by the RMS of the param.
      clipping_threshold: largest RMS of the update (None: no clipping).
      eps: added to `|g|^2`, >= 0.
      weight_decay: decoupled weight decay coefficient, >= 0 (see above).
      mask: which leaves are decayed (None: all); `weight_decay_mask` is optax's name for it.
      momentum: EMA coefficient of the steps in [0, 1), or None for none.
      dtype_momentum: dtype of the momentum buffer (optax's default, float32).
      weight_decay_rate: optax's weight decay, not multiplied by the learning rate; a number,
        a schedule or None. Giving both it and a nonzero `weight_decay` is a ValueError.
      weight_decay_mask: optax's name for `mask` (give one of them).
      factored: whether to factor large leaves at all.
      weight_decay_mode: "lr_scaled" or "independent", for `weight_decay`.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
      <https://arxiv.org/abs/1804.04235>`_, 2018.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = optim.adafactor(learning_rate=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for _ in range(3):
      ...   updates, state = solver.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f"{f(params):.3f}")
      11.548
      9.654
      8.166
    """
    if weight_decay_rate is not None and not _is_python_zero(weight_decay) and not isinstance(
            weight_decay, jax.Array):
        raise ValueError(f"weight_decay and weight_decay_rate are two spellings of the decay: "
                         f"give one, got weight_decay={weight_decay!r} and "
                         f"weight_decay_rate={weight_decay_rate!r}")
    if mask is not None and weight_decay_mask is not None:
        raise ValueError(f"mask and weight_decay_mask are two spellings of the decay mask: "
                         f"give one, got mask={mask!r} and weight_decay_mask="
                         f"{weight_decay_mask!r}")
    mask = weight_decay_mask if mask is None else mask
    if weight_decay_rate is not None and not callable(weight_decay_rate):
        _validate.non_negative("weight_decay_rate", weight_decay_rate)
    chain = [scale_by_adafactor(min_dim_size_to_factor, decay_rate, decay_offset,
                                clipping_threshold, multiply_by_parameter_scale, eps, factored)]
    if learning_rate is not None:
        _validate.learning_rate(learning_rate)
        chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    dtype_momentum = _validate.state_dtype("dtype_momentum", dtype_momentum)
    if momentum is not None:
        _validate.in_range("momentum", momentum)
        chain.append(optax.ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
    # The decay term is `coefficient_t * w`, added after the lr (and momentum), as in optax.
    per_unit_lr = decay_per_unit_lr(1.0 if learning_rate is None else learning_rate,
                                      weight_decay, weight_decay_mode)
    parts = [] if weight_decay_rate is None else [weight_decay_rate]
    if not _is_python_zero(per_unit_lr):
        parts.append(_times(1.0 if learning_rate is None else learning_rate, per_unit_lr))
    chain.append(add_decoupled_weight_decay(_sum(parts), mask))
    chain.append(optax.scale(-1.0))
    return optax.chain(*chain)


def _times(learning_rate, coefficient):
    """`lr_t * coefficient`, a number or a schedule as `learning_rate` is."""
    if callable(learning_rate):
        return lambda step: learning_rate(step) * coefficient
    return learning_rate * coefficient


def _sum(coefficients):
    """The sum of numbers and schedules, a schedule if any of them is one (0 if none)."""
    if not any(callable(c) for c in coefficients):
        return sum(coefficients, 0.0) if coefficients else 0.0
    return lambda step: sum(c(step) if callable(c) else c for c in coefficients)
