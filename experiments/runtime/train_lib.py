"""The pure parts of a training step: gradient accumulation, loss scaling, skipping
non-finite steps, clipping and weight averages. No I/O, no host syncs; jit-able as a whole.

The train state is a `runtime.state.TrainState` (step, params, opt_state, loss_scale,
skipped, and the optional ema / tail average).

Step semantics: `train_step(state, batch)` with `batch` [K, B, T + 1] (K = grad_accum
micro-batches of B rows) computes the loss and gradient of every micro-batch at the same
params and loss scale, averages them, and applies one optimizer update. With non-finite
gradients the params, optimizer state and averages stay as they were, `skipped` grows and
the loss scale shrinks (if dynamic); `step` always grows by one.
"""
import jax
import jax.numpy as jnp
import optax

from ravine import models
from ravine import optim
from ravine.experiments.runtime import layer_norms as layer_norms_lib
from ravine.experiments.runtime.state import TrainState
from ravine.experiments.runtime.state import init_state as _init_state


def lm_loss(model):
    """`loss_fn(params, tokens[B, T + 1])`: next-token cross-entropy of `model`.

    Tokens may come as uint8 bytes (a quarter of int32's host-to-device traffic)."""

    def loss_fn(params, tokens):
        tokens = tokens.astype(jnp.int32)
        logits = model.apply({"params": params}, tokens[:, :-1])
        return models.cross_entropy(logits, tokens[:, 1:])

    return loss_fn


def with_clipping(tx, clip_norm):
    """`tx` preceded by global-norm clipping (`optax.clip_by_global_norm`); 0 leaves it as is.

    Clipping sees the unscaled, accumulated gradients, before any optimizer statistics.
    """
    if clip_norm < 0:
        raise ValueError(f"clip_norm must be >= 0 (0 = off), got {clip_norm!r}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def _grad_dtype(param):
    return jnp.promote_types(param.dtype, jnp.float32)


def mean_loss_and_grad(loss_fn, params, batch, loss_scale):
    """Mean loss and gradient over the micro-batches `batch[0], ..., batch[K - 1]`.

    `grad = (1/K) sum_k unscale(d scale(loss(params, batch[k])) / d params)`: each
    micro-batch is differentiated with the same loss scale, gradients are summed in float32
    (at least) and cast back to the params' dtype. Equal micro-batch sizes make this the
    gradient of the mean loss over all K * B rows.

    Returns:
      (loss, grads): the unscaled mean loss (float32) and gradients (params' dtypes).
    """
    def scaled_loss(p, tokens):
        loss = loss_fn(p, tokens)
        return loss_scale.scale(loss), loss

    grad_fn = jax.grad(scaled_loss, has_aux=True)
    micro_steps = batch.shape[0]
    if micro_steps == 1:
        grads, loss = grad_fn(params, batch[0])
    else:
        def accumulate(carry, tokens):
            grad_sum, loss_sum = carry
            grads, loss = grad_fn(params, tokens)
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
            return (grad_sum, loss_sum + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _grad_dtype(p)), params)
        (grad_sum, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros(())), batch)
        grads = jax.tree.map(lambda s, p: (s / micro_steps).astype(p.dtype), grad_sum, params)
        loss = loss_sum / micro_steps
    return loss.astype(jnp.float32), loss_scale.unscale(grads)


def init_state(params, tx, loss_scale, ema_decay=0.0, average_from_step=-1) -> TrainState:
    """The `TrainState` at step 0 around `params`, with `tx`'s initial state."""
    return _init_state(params, tx.init(params), loss_scale, ema_decay, average_from_step)


def params_of(params, opt_state):
    """The point to evaluate (and average) a model at: its params. (Schedule-Free's is
    another, see `optim.schedule_free_eval_params`.)"""
    del opt_state
    return params


def make_train_step(loss_fn, tx, schedule, ema_decay=0.0, average_from_step=-1,
                    layer_norms=False, update_args=None, eval_params=params_of):
    """`train_step(state, batch) -> (state, metrics)`, pure (see the module docstring).

    Args:
      loss_fn: `loss_fn(params, tokens) -> scalar loss`.
      tx: the optimizer (an `optax.GradientTransformation`, clipping included).
      schedule: `count -> lr`, the optimizer's learning rate, only to report `lr`.
      ema_decay: EMA decay of `state.ema` (0 = no EMA in the state).
      average_from_step: the tail average takes params from this step on (-1 = none).
      layer_norms: also return `metrics["layers"]`, the per-group gradient, update and
        param norms of `experiments.layer_norms`.
      update_args: `(params, micro_batch, step) -> dict` of extra keyword arguments for
        `tx.update` (an `optax.GradientTransformationExtraArgs`, e.g. Sophia's
        `hessian_fn`); None: none.
      eval_params: `(params, opt_state) -> params` the EMA and tail average follow (and
        the train job evaluates); default the params themselves.

    Metrics (scalars): loss, grad_norm (global norm before clipping), lr (of this update),
    finite (whether the update was applied), loss_scale; with `layer_norms`, "layers".
    """
    def train_step(state: TrainState, batch):
        params, loss_scale = state.params, state.loss_scale
        loss, grads = mean_loss_and_grad(loss_fn, params, batch, loss_scale)
        finite = optim.all_finite(grads)
        # extra update arguments (Sophia's Hessian estimate) see the first micro-batch
        extra = update_args(params, batch[0], state.step) if update_args else {}
        updates, opt_state = tx.update(grads, state.opt_state, params, **extra)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        if ema_decay or average_from_step >= 0:
            eval_point = eval_params(new["params"], opt_state)  # Schedule-Free: x
        if ema_decay:
            new["ema"] = optim.ema_params(state.ema, eval_point, ema_decay)
        if average_from_step >= 0:
            new["average"] = optim.update_tail_average(
                state.average, eval_point, active=state.step + 1 >= average_from_step)
        # Updates applied before this one: the count the optimizer's schedule sees.
        applied = state.step - state.skipped
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(schedule(applied), jnp.float32), "finite": finite,
                   "loss_scale": loss_scale.loss_scale}
        if layer_norms:
            metrics["layers"] = layer_norms_lib.layer_norms(grads, updates, params)
        # a non-finite step changes nothing but the counters and the loss scale
        old = {key: getattr(state, key) for key in new}
        state = state._replace(**optim.select_tree(finite, new, old), step=state.step + 1,
                               loss_scale=loss_scale.adjust(finite),
                               skipped=state.skipped + (~finite).astype(jnp.int32))
        return state, metrics

    return train_step


def make_eval_step(loss_fn):
    """`eval_step(params, batch[K, B, T + 1]) -> mean loss` over the K sub-batches."""
    def eval_step(params, batch):
        return jax.lax.map(lambda tokens: loss_fn(params, tokens), batch).mean()

    return eval_step
