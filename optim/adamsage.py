"""AdamSAGE: Adam with a per-parameter learning rate guided by the parameter's sensitivity.

The sensitivity of a parameter is the first-order change of the loss if it were zeroed,
`I = |theta * g|`. SAGE (Sensitivity-guided Adaptive learninG ratE) keeps an EMA `I_bar` of
it and multiplies each parameter's learning rate by `|I - I_bar| / I_bar`: parameters with
low sensitivity (redundant, under-trained) get larger steps, well-trained high-sensitivity
ones smaller, and the numerator (the sensitivity's local temporal variation, its
uncertainty) keeps steps small where the estimate is stable.

References:
  Liang et al., 2022, "No Parameters Left Behind: Sensitivity Guided Adaptive Learning Rate
  for Training Large Transformer Models" (ICLR 2022), https://arxiv.org/abs/2202.02664;
  official code: github.com/cliang1453/SAGE (module/bert_optim.py, `UnstructAwareAdamW`).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate
from ravine.optim.alias import MaskOrFn, decay_and_scale, mask_per_leaf


class AdamSageState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates  # EMA of the gradients (decay b1)
    nu: optax.Updates  # EMA of the squared gradients (decay b2)
    sensitivity: optax.Updates  # EMA of |theta * g| (decay b3); a 0-d zero where not used


def scale_by_adamsage(b1: float = 0.9, b2: float = 0.999, b3: float = 0.75,
                      eps: float = 1e-6, sage_mask: MaskOrFn = None,
                      correct_bias: bool = True) -> optax.GradientTransformation:
    """The AdamSAGE direction (no learning rate, no sign flip), as the authors' AdamW-SAGE.

    At step t (from 1), per parameter, with theta the params before the step:

        m = b1 m + (1 - b1) g,        v = b2 v + (1 - b2) g^2
        I = |theta * g|,              I_bar = b3 I_bar + (1 - b3) I
        I_hat = I_bar / (1 - b3^t)                         (bias-corrected sensitivity)
        U = |I - I_hat|                                    (its local temporal variation)
        update = U / (I_hat + eps^2) * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    With `correct_bias=False` (the code's other branch, BERT-style) neither Adam's moments
    nor `I_bar` are bias-corrected: `update = |I - I_bar| / (I_bar + eps^2) * m /
    (sqrt(v) + eps)`.

    Adam's part is PyTorch AdamW's (eps added to `sqrt(v)` before the bias correction,
    i.e. `m^ / (sqrt(v^) + eps / sqrt(1 - b2^t))`), as in the authors' code. Leaves not
    chosen by `sage_mask` take that Adam step unscaled (the code's "common" groups: it
    applies SAGE to the encoder's linear layers only) and keep a 0-d placeholder instead
    of `I_bar`.

    Consequences of the rule worth knowing. SAGE feeds on gradient noise: with
    `correct_bias` the first step is zero (`I_hat = I`), and on a deterministic gradient at
    unchanged params `U = 0`, so full-batch training on a fixed batch never moves; use
    minibatches (or `correct_bias=False`, whose first step is `b3 / (1 - b3)` times Adam's).
    A parameter that is exactly 0 has `I = 0` and never moves: leave zero-initialized
    biases or norm offsets trained from scratch out with `sage_mask` (e.g.
    `optim.decay_mask`).

    Args:
      b1: decay of Adam's first moment, in [0, 1).
      b2: decay of Adam's second moment, in [0, 1).
      b3: decay of the sensitivity's EMA, in [0, 1) (the authors' default 0.75; their
        README: 0.6-0.9 works, with a learning rate 2-5x Adam's).
      eps: Adam's epsilon, >= 0; `eps^2` guards the sensitivity's denominator.
      sage_mask: which leaves get the sensitivity scaling (None: all; a pytree of bools
        or a callable `params -> pytree of bools`).
      correct_bias: bias-correct Adam's moments and the sensitivity's EMA (the code's
        default, True).

    Returns:
      An `optax.GradientTransformation` whose state is an `AdamSageState`. Its update needs
      `params`.

    References:
      Liang et al., `No Parameters Left Behind: Sensitivity Guided Adaptive Learning Rate
      for Training Large Transformer Models <https://arxiv.org/abs/2202.02664>`_, 2022.

    Example:
      >>> tx = optax.chain(scale_by_adamsage(b3=0.85), optax.scale(-1e-3))
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.in_range("b3", b3)
    _validate.non_negative("eps", eps)

    def init_fn(params):
        return AdamSageState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            sensitivity=jax.tree.map(
                lambda p, on: jnp.zeros_like(p) if on else jnp.zeros([], jnp.asarray(p).dtype),
                params, mask_per_leaf(sage_mask, params)))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_adamsage needs params: the sensitivity is |params * g|")
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        if correct_bias:
            t = count.astype(jnp.float32)
            b1_t = 1 - jnp.asarray(b1, jnp.float32) ** t
            b2_t = 1 - jnp.asarray(b2, jnp.float32) ** t
            b3_t = 1 - jnp.asarray(b3, jnp.float32) ** t
            step_size = jnp.sqrt(b2_t) / b1_t
        else:
            b3_t = step_size = jnp.ones([], jnp.float32)

        def leaf(g, p, m, v, s_bar, on):
            adam = step_size.astype(m.dtype) * m / (jnp.sqrt(v) + eps)
            if not on:
                return adam, s_bar
            s = jnp.abs(p * g)
            s_bar = (1 - b3) * s + b3 * s_bar
            s_hat = s_bar / b3_t.astype(s_bar.dtype)
            return adam * (jnp.abs(s - s_hat) / (s_hat + eps ** 2)), s_bar

        both = jax.tree.map(leaf, updates, params, mu, nu, state.sensitivity,
                            mask_per_leaf(sage_mask, params))
        # `both` holds an (update, sensitivity) pair where `updates` holds a leaf.
        new_updates = jax.tree.map(lambda _, pair: pair[0], updates, both)
        sensitivity = jax.tree.map(lambda _, pair: pair[1], updates, both)
        return new_updates, AdamSageState(count, optax.tree.cast_like(mu, state.mu),
                                          optax.tree.cast_like(nu, state.nu),
                                          optax.tree.cast_like(sensitivity, state.sensitivity))

    return optax.GradientTransformation(init_fn, update_fn)


def adamsage(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             b3: float = 0.75, eps: float = 1e-6, weight_decay: float = 0.0,
             mask: MaskOrFn = None, weight_decay_mode: str = "lr_scaled",
             sage_mask: MaskOrFn = None,
             correct_bias: bool = True) -> optax.GradientTransformation:
    """AdamSAGE (Liang et al., 2022): step `-lr * (adamsage_direction + wd * params)`.

    See `scale_by_adamsage` for the direction; defaults are the authors' AdamW-SAGE
    (`UnstructAwareAdamW(lr, betas=(0.9, 0.999), beta3=0.75, eps=1e-6, weight_decay=0)`).

    Differences from the authors' code: weight decay is ravine's decoupled decay
    (`-lr_t * wd * theta_t`, from the params before the step), where the code multiplies the
    params *after* the step by `1 - lr * wd` with the unscheduled lr; and its optimizer
    class clips each tensor's gradient to norm 1 (`max_grad_norm=1.0`) itself, which in
    ravine is a separate transform (`optax.clip_by_global_norm`, or `clip_norm` in the
    train config) and is not done here.

    Args:
      learning_rate: a number or a schedule `step -> lr` (from step 0); the authors found
        2-5x AdamW's learning rate works.
      b1, b2, b3, eps, sage_mask, correct_bias: see `scale_by_adamsage`.
      weight_decay: decoupled weight decay coefficient, >= 0.
      mask: which leaves are decayed (None: all; a pytree of bools or a callable).
      weight_decay_mode: "lr_scaled" or "independent" (see `optim.decay_and_scale`).

    Returns:
      An `optax.GradientTransformation`.

    References:
      Liang et al., `No Parameters Left Behind: Sensitivity Guided Adaptive Learning Rate
      for Training Large Transformer Models <https://arxiv.org/abs/2202.02664>`_, 2022.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine.optim.adamsage import adamsage
      >>> def f(x): return jnp.sum(x ** 2)
      >>> solver = adamsage(learning_rate=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = solver.init(params)
      >>> for key in jax.random.split(jax.random.key(0), 20):  # noisy gradients
      ...   grads = jax.grad(f)(params) + jax.random.normal(key, params.shape)
      ...   updates, state = solver.update(grads, state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(f"{f(params):.3f}")
      10.792
    """
    return optax.chain(scale_by_adamsage(b1, b2, b3, eps, sage_mask, correct_bias),
                       decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
