"""First-order optimizers: each is `chain(scale_by_*, weight decay, learning rate)`.

`learning_rate` is a float or a schedule `step -> lr` (evaluated at the optimizer's own step,
from 0). `mask` chooses the leaves that get weight decay: None (all), a pytree of bools, or a
callable `params -> pytree of bools` such as `decay_mask`.

The helpers `scale_by_learning_rate` and `add_decoupled_weight_decay` are shared by every
optimizer in this package (Shampoo, SOAP and Muon build their chains with them too).
"""
import jax
import optax

from optim import _validate
from optim.transforms import (scale_by_adafactor, scale_by_adagrad, scale_by_adam,
                              scale_by_lion, scale_by_momentum, scale_by_rms)


def _is_python_zero(value):
    # Only a Python number can drop a transform: under `optax.inject_hyperparams` values arrive
    # as (possibly traced) arrays, and init and update must then build the same chain.
    return isinstance(value, (int, float)) and value == 0


def scale_by_learning_rate(learning_rate):
    """Multiplies updates by `-learning_rate` (a float, or a schedule `step -> lr`).

    A schedule is evaluated at the transform's own step counter, starting at 0.
    """
    _validate.learning_rate(learning_rate)
    return optax.scale_by_learning_rate(learning_rate)


def add_decoupled_weight_decay(weight_decay, mask=None):
    """Adds `weight_decay * params` to the updates (decoupled decay, Loshchilov & Hutter 2019).

    Placed before `scale_by_learning_rate`, the step becomes `-lr * (direction + wd * params)`.

    Args:
      weight_decay: the decay coefficient; 0 gives the identity transform (no state, no work).
      mask: None (decay every leaf), a pytree of bools, or a callable `params -> pytree of bools`
        choosing which leaves are decayed.
    """
    _validate.non_negative("weight_decay", weight_decay)
    if _is_python_zero(weight_decay):
        return optax.identity()
    return optax.add_decayed_weights(weight_decay, mask)


def decay_mask(params):
    """True for leaves with ndim >= 2: decay weight matrices and kernels, not biases or scales."""
    return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def sgd(learning_rate, momentum=0.0, nesterov=False, weight_decay=0.0, mask=None):
    """SGD with optional heavy-ball / Nesterov momentum and decoupled weight decay.

    `m_t = g_t + momentum * m_{t-1}`; step `-lr * (m_t + wd * params)` (Nesterov: `m_t` is
    replaced by `g_t + momentum * m_t`). Equals `optax.sgd`, with `optax.add_decayed_weights`
    between momentum and learning rate when weight_decay > 0. Robbins & Monro (1951),
    Polyak (1964), Sutskever et al. (2013).
    """
    _validate.in_range("momentum", momentum)
    direction = optax.identity() if _is_python_zero(momentum) else scale_by_momentum(
        momentum, nesterov)
    return optax.chain(direction,
                       add_decoupled_weight_decay(weight_decay, mask),
                       scale_by_learning_rate(learning_rate))


def adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7):
    """AdaGrad (Duchi et al., 2011): step `-lr * g_t / sqrt(sum_{s<=t} g_s^2 + eps)`.

    See `scale_by_adagrad`; equals `optax.adagrad`.
    """
    return optax.chain(scale_by_adagrad(initial_accumulator_value, eps),
                       scale_by_learning_rate(learning_rate))


def rmsprop(learning_rate, decay=0.9, eps=1e-8, momentum=0.0, nesterov=False):
    """RMSProp (Tieleman & Hinton, 2012): step `-lr * g_t / sqrt(v_t + eps)`, then momentum.

    `v_t` is the EMA of `g^2` (see `scale_by_rms`). As in `optax.rmsprop` (and TensorFlow),
    momentum accumulates the lr-scaled steps, so it comes after the learning rate here.
    """
    _validate.in_range("momentum", momentum)
    momentum_tx = optax.identity() if _is_python_zero(momentum) else scale_by_momentum(
        momentum, nesterov)
    return optax.chain(scale_by_rms(decay, eps),
                       scale_by_learning_rate(learning_rate),
                       momentum_tx)


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0):
    """Adam (Kingma & Ba, 2015): step `-lr * m^_t / (sqrt(v^_t + eps_root) + eps)`.

    `m^`, `v^` are the bias-corrected moments (see `scale_by_adam`); equals `optax.adam`.
    """
    return optax.chain(scale_by_adam(b1, b2, eps, eps_root),
                       scale_by_learning_rate(learning_rate))


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, mask=None):
    """AdamW (Loshchilov & Hutter, 2019): step `-lr * (adam_direction + wd * params)`.

    Equals `optax.adamw`.
    """
    return optax.chain(scale_by_adam(b1, b2, eps),
                       add_decoupled_weight_decay(weight_decay, mask),
                       scale_by_learning_rate(learning_rate))


def lion(learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3, mask=None):
    """Lion (Chen et al., 2023): step `-lr * (sign(b1 m + (1-b1) g) + wd * params)`.

    Then `m <- b2 m + (1-b2) g` (see `scale_by_lion`). Equals `optax.lion`. Lion's steps have
    unit size per coordinate: use a learning rate 3-10x smaller than AdamW's.
    """
    return optax.chain(scale_by_lion(b1, b2),
                       add_decoupled_weight_decay(weight_decay, mask),
                       scale_by_learning_rate(learning_rate))


def adafactor(learning_rate, min_dim_size_to_factor=128, decay_rate=0.8, decay_offset=0,
              multiply_by_parameter_scale=True, clipping_threshold=1.0, eps=1e-30,
              weight_decay=0.0, mask=None):
    """Adafactor (Shazeer & Stern, 2018): factored second moments, update clipping, relative step.

    Step `-lr * (u + wd * params)` with `u` from `scale_by_adafactor`. Equals
    `optax.adafactor(learning_rate, ...)` with the same arguments (and momentum=None); one
    difference: our `weight_decay` is multiplied by the learning rate (decoupled, as in
    `adamw`), where optax's `weight_decay_rate` is not.
    """
    return optax.chain(
        scale_by_adafactor(min_dim_size_to_factor, decay_rate, decay_offset,
                           clipping_threshold, multiply_by_parameter_scale, eps),
        add_decoupled_weight_decay(weight_decay, mask),
        scale_by_learning_rate(learning_rate))
