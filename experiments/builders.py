"""Where a config becomes objects: validation, model, schedule, optimizer, loss scale, step.

Everything here is pure (no files, no devices touched, no mesh): the train job, the race's
sweeps and anything else that trains from an `experiments/configs/lm.py` config build their
pieces here, so a flag means the same thing everywhere.

    from ravine.experiments import builders
    from ravine.experiments.configs import lm

    config = lm.get_config("tiny")
    builders.validate(config)                       # ValueError naming a bad field
    schedule = builders.build_schedule(config)      # step -> lr
    tx = builders.build_optimizer(config, schedule) # optax.GradientTransformation
    fns = builders.make_train_step(config)          # init(key), train_step, eval_step
    state = fns.init(jax.random.key(config.seed))
    state, metrics = jax.jit(fns.train_step)(state, batch)   # batch uint8 [K, B, T + 1]

`make_train_step(config, tx=...)` takes any object with optax's `init(params)` /
`update(grads, state, params)` in place of the config's optimizer: e.g. an optimizer
wrapped in `optax.inject_hyperparams` so a sweep can feed the learning rate as data.
"""
import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine import sharding
from ravine.experiments import profiling, token_files, train_lib, writers
from ravine.experiments.configs import lm
from ravine.models import pipeline
from ravine.optim import _validate, schedules, sophia_estimates

LOSS_SCALES = ("auto", "none", "dynamic")


def validate(config):
    """Checks the scalar fields; ValueError naming the field and its value."""
    for name in ("steps", "batch_size", "seq_len", "log_every", "grad_accum", "eval_batches",
                 "microbatches",
                 "keep_checkpoints", "spike_window", "spike_patience"):
        _validate.positive_int(f"config.{name}", config[name])
    for name in ("seed", "eval_every", "checkpoint_every", "spike_skip"):
        _validate.non_negative_int(f"config.{name}", config[name])
    _validate.learning_rate(config.optimizer.learning_rate, "config.optimizer.learning_rate")
    _validate.one_of("config.zero", config.zero, sharding.partition.ZERO_STAGES)
    _validate.one_of("config.loss_scale", config.loss_scale, LOSS_SCALES)
    _validate.non_negative("config.clip_norm", config.clip_norm)
    _validate.non_negative("config.peak_flops", config.peak_flops)
    _validate.in_range("config.ema_decay", config.ema_decay)
    _validate.greater_than("config.spike_factor", config.spike_factor, 1)
    if not isinstance(config.average_from_step, int) or config.average_from_step < -1:
        raise ValueError(f"config.average_from_step must be -1 (off) or a step >= 0, got "
                         f"{config.average_from_step!r}")
    _validate.non_negative_int("config.spike_max_rollbacks", config.spike_max_rollbacks)
    _validate.one_of("config.preempt_exit_code", config.preempt_exit_code, range(256))
    _validate.one_of("config.init_from_optimizer", config.init_from_optimizer, (True, False))
    check_schedule_free(config)
    if not isinstance(config.init_from, str):
        raise ValueError(f"config.init_from must be DIR or DIR:STEP, got {config.init_from!r}")
    check_precision(config)
    profiling.parse_steps(config.get("profile_steps", ""))
    writers.validate(config)


# The smallest positive normal float16: an epsilon below it is lost in float16 arithmetic.
FLOAT16_TINY = float(np.finfo(np.float16).tiny)


def check_precision(config):
    """Refuses float16 params with an optimizer whose epsilon float16 cannot hold.

    Optax-style optimizers keep their moments in the params' dtype, so with float16 params
    Adam's `sqrt(v) + eps` is computed in float16: eps = 1e-8 underflows to 0 and the
    first small gradient divides by zero (NaN from step 2, measured on the tiny LM).
    """
    policy = models.get_policy(config.precision)
    if np.dtype(policy.param_dtype) != np.float16:
        return
    factory = getattr(optim, config.optimizer.name, None)
    if factory is None or "eps" not in inspect.signature(factory).parameters:
        return
    eps = config.optimizer.get("eps")
    eps = inspect.signature(factory).parameters["eps"].default if eps is None else eps
    if isinstance(eps, (int, float)) and 0 <= eps < FLOAT16_TINY:
        raise ValueError(
            f"config.precision={config.precision!r} keeps {config.optimizer.name}'s state in "
            f"float16, where eps={eps:g} underflows (float16's smallest normal is "
            f"{FLOAT16_TINY:.3g}); use float32 params (master weights) with float16 compute: "
            "--config.precision=params=float32,compute=float16,output=float32, or set "
            f"--config.optimizer.eps >= {FLOAT16_TINY:.3g}")


def check_schedule_free(config):
    """Schedule-Free AdamW replaces the schedule: it takes a constant learning rate (its own
    `optimizer.warmup_steps` warm it up), so any other schedule is refused."""
    if config.optimizer.name != "schedule_free_adamw":
        return
    if config.schedule.name != "constant":
        raise ValueError(
            f"config.schedule.name={config.schedule.name!r}: schedule_free_adamw takes a "
            "constant learning rate (--config.schedule.name=constant "
            "--config.schedule.warmup_steps=None; warm up with "
            "--config.optimizer.warmup_steps=N)")


def build_schedule(config):
    """`optim.schedules.<schedule.name>(**args)` from the schedule fields that are set;
    `peak_value` (`value` for constant) defaults to optimizer.learning_rate and
    `total_steps` to steps."""
    name = config.schedule.name
    if name not in lm.SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(lm.SCHEDULES)}")
    function = getattr(schedules, name)
    accepted = inspect.signature(function).parameters
    args = {key: value for key, value in config.schedule.items()
            if key != "name" and value is not None}
    unknown = sorted(set(args) - set(accepted) - {"peak_value"})
    if unknown:
        raise ValueError(f"schedule {name!r} takes no {unknown[0]} (config.schedule."
                         f"{unknown[0]}={args[unknown[0]]!r}; set it to None)")
    peak = args.pop("peak_value", config.optimizer.learning_rate)
    args["value" if "value" in accepted else "peak_value"] = peak
    if "total_steps" in accepted:
        args.setdefault("total_steps", config.steps)
    missing = [key for key, arg in accepted.items()
               if arg.default is inspect.Parameter.empty and key not in args]
    if missing:
        raise ValueError(f"schedule {name!r} needs config.schedule.{missing[0]}")
    return function(**args)


def path_keys(path):
    """The names along a pytree key path (dict keys, attribute names, sequence indices), as
    strings: `{"block_0", "mlp", "up", "kernel"}` for `['block_0']['mlp']['up']['kernel']`."""
    return {str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
            for key in path}


def no_decay_mask(keys):
    """A weight-decay `mask`: False for leaves with any path key in the comma list `keys`."""
    skipped = {key.strip() for key in keys.split(",") if key.strip()}

    def mask(params):
        return jax.tree.map_with_path(lambda path, _: not path_keys(path) & skipped, params)

    return mask


def _is_dtype_argument(parameter):
    """Whether an optimizer argument takes a dtype: its default is neither None nor a
    number, string or bool (e.g. `statistics_dtype=jnp.float32`)."""
    default = parameter.default
    return default not in (None, inspect.Parameter.empty) and not isinstance(
        default, (str, bool, int, float))


def _as_dtype(name, value):
    try:
        return jnp.dtype(value)
    except TypeError:
        raise ValueError(f"config.optimizer.{name} must be a dtype name, got {value!r}") from None


def optimizer_hparams(config):
    """The optimizer's keyword arguments set in `config.optimizer` (None = its default):
    every field but `lm.NON_HPARAM_KEYS`, dtype names (`"bfloat16"`) turned into dtypes."""
    cfg = config.optimizer
    factory = getattr(optim, cfg.name, None)
    accepted = inspect.signature(factory).parameters if factory is not None else {}
    hparams = {}
    for key, value in cfg.items():
        if key in lm.NON_HPARAM_KEYS or value is None:
            continue
        if isinstance(value, str) and key in accepted and _is_dtype_argument(accepted[key]):
            value = _as_dtype(key, value)
        hparams[key] = value
    return hparams


def build_optimizer(config, schedule):
    """`optim.create(optimizer.name, **set hparams)` with the schedule as learning rate,
    `mask` from no_decay and `muon_mask` from muon_exclude (where the optimizer takes them),
    preceded by global-norm clipping when clip_norm > 0."""
    cfg = config.optimizer
    name = cfg.name
    if name not in optim.available() or not hasattr(optim, name):
        known = [n for n in optim.available() if hasattr(optim, n)]
        known += registered_train_steps()
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(known)}")
    accepted = inspect.signature(getattr(optim, name)).parameters
    hparams = optimizer_hparams(config)
    hparams["learning_rate"] = schedule
    if hparams.get("adam_learning_rate") is not None:
        # Muon's AdamW leaves: the same schedule shape, peaking at adam_learning_rate.
        adam_peak = hparams["adam_learning_rate"]
        _validate.learning_rate(adam_peak, "config.optimizer.adam_learning_rate")
        if cfg.learning_rate:
            ratio = adam_peak / cfg.learning_rate

            def adam_schedule(step):
                return ratio * schedule(step)

            adam_schedule.peak_value = adam_peak  # for weight_decay_mode="independent"
            hparams["adam_learning_rate"] = adam_schedule
    if "mask" in accepted and cfg.no_decay:
        hparams["mask"] = no_decay_mask(cfg.no_decay)
    if "muon_mask" in accepted:
        exclude = tuple(key.strip() for key in cfg.muon_exclude.split(",") if key.strip())
        hparams["muon_mask"] = optim.hidden_matrices(exclude=exclude)
    try:
        tx = optim.create(name, **hparams)  # the registry rejects unknown hyperparameters
    except ValueError as error:
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise ValueError(f"{error} (unset with --config.optimizer.{unknown[0]}=None)"
                             ) from None
        raise
    if pipeline_stages(config) > 1:
        pipeline.check_optimizer(name)
        tx = pipeline.per_layer(tx)  # stacked blocks: the layer axis is a batch axis
    return train_lib.with_clipping(tx, config.clip_norm)


def pipeline_stages(config):
    """The size of the mesh's `stage` axis (1: no pipeline)."""
    return sharding.parse_mesh_spec(config.mesh).get(sharding.STAGE, 1)


def build_loss_scale(config, policy):
    """Dynamic loss scaling when asked, or with "auto" when any policy dtype is float16."""
    dtypes = (policy.param_dtype, policy.compute_dtype, policy.output_dtype)
    if config.loss_scale == "dynamic" or (
            config.loss_scale == "auto" and np.dtype(np.float16) in dtypes):
        return optim.DynamicLossScale()
    return optim.NoOpLossScale()


def build_model_config(config):
    """The TransformerConfig: config.model, config.vocab_size (default 256, bytes), policy
    from precision."""
    fields = dict(config.model.items())
    known = {f.name for f in dataclasses.fields(models.TransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model field config.model.{unknown[0]}")
    if fields["max_len"] < config.seq_len:
        raise ValueError(f"config.model.max_len ({fields['max_len']}) must be >= "
                         f"config.seq_len ({config.seq_len})")
    return models.TransformerConfig(vocab_size=token_files.vocab_size(config),
                                    policy=config.precision, **fields)


class TrainFunctions(NamedTuple):
    """The pure functions of one training configuration (none jitted, none sharded).

    Attributes:
      init: `key -> state`, the train state at step 0 (see experiments/train_lib.py).
      train_step: `(state, batch[K, B, T + 1]) -> (state, metrics)`.
      eval_step: `(params, batch[K, B, T + 1]) -> mean loss`.
      init_params: `key -> boxed params` (flax logical-axis boxes, for shardings).
      loss_fn: `(params, tokens[B, T + 1]) -> loss`.
      model_config, schedule, tx, loss_scale: what they were built from.
      eval_params: `(params, opt_state) -> params` to evaluate at (Schedule-Free's x).
      step_for_loss: `loss_fn -> train_step`, the same step around another loss function
        (the train job's ZeRO-2/3 one, whose gradients are reduce-scattered); None for a
        registered step (`register_train_step`), which the train job then runs with ZeRO
        0 or 1 only.
    """
    init: Callable[[Any], Any]
    train_step: Callable[[Any, Any], Any]
    eval_step: Callable[[Any, Any], Any]
    init_params: Callable[[Any], Any]
    loss_fn: Callable[[Any, Any], Any]
    model_config: models.TransformerConfig
    schedule: Callable[[Any], Any]
    tx: Any
    loss_scale: Any
    eval_params: Callable[[Any, Any], Any] = train_lib.params_of
    step_for_loss: Callable[[Any], Any] | None = None


# optimizer.name -> `make(config) -> TrainFunctions`, for optimizers that are not Optax
# transforms (their step is their own); see `register_train_step`.
_STEP_MAKERS = {}


def register_train_step(name, make):
    """Makes `config.optimizer.name == name` build its step functions with `make(config)`.

    The seam for an optimizer that is not an `optax.GradientTransformation` (e.g. one whose
    update needs the loss function or the batch): `make` returns a `TrainFunctions` whose
    `train_step(state, batch) -> (state, metrics)` does the whole update, with the same
    state keys and metrics as `train_lib.make_train_step`'s (its `tx` needs only `init`, for
    the optimizer state's shardings). The train job, its checkpoints and the race then use
    it like any other optimizer. Start from `make_train_step(config, tx=...)`'s pieces
    (`loss_fn`, `init_params`, `schedule`, `loss_scale`) and replace what differs.
    """
    _STEP_MAKERS[name] = make


def registered_train_steps():
    """The optimizer names whose step is their own (`register_train_step`), e.g. "kfac"."""
    return sorted(_STEP_MAKERS)


def make_train_step(config, tx=None, schedule=None):
    """The model, optimizer and step functions of `config` (validated first).

    Args:
      config: an `experiments/configs/lm.py` config.
      tx: an optimizer to use instead of the config's (anything with optax's
        `init` / `update`, clipping included); default `build_optimizer(config, schedule)`.
      schedule: `count -> lr`, only reported as the `lr` metric; default
        `build_schedule(config)`.

    Returns:
      A `TrainFunctions`.
    """
    validate(config)
    if tx is None and config.optimizer.name in _STEP_MAKERS:
        # A registered step is its own: no ZeRO-2/3 variant around another loss function.
        return _STEP_MAKERS[config.optimizer.name](config)._replace(step_for_loss=None)
    model_config = build_model_config(config)
    model = models.Transformer(model_config)
    if pipeline_stages(config) > 1:  # GPipe over the stage axis: config.microbatches per batch
        pipeline.check_divisible(model_config.n_layers, pipeline_stages(config),
                                 config.batch_size, config.microbatches)
        model = pipeline.Pipelined(model_config, config.microbatches)
    schedule = build_schedule(config) if schedule is None else schedule
    tx = build_optimizer(config, schedule) if tx is None else tx
    loss_scale = build_loss_scale(config, models.get_policy(config.precision))
    dummy = jnp.zeros((1, config.seq_len), jnp.int32)

    def init_params(key):
        return model.init(key, dummy)["params"]

    def init(key):
        return train_lib.init_state(nn.unbox(init_params(key)), tx, loss_scale,
                                    config.ema_decay, config.average_from_step)

    loss_fn = train_lib.lm_loss(model)
    step_kwargs = optimizer_step_kwargs(config, model)

    def step_for_loss(loss):
        return train_lib.make_train_step(loss, tx, schedule, config.ema_decay,
                                         config.average_from_step,
                                         config.get("layer_norms", False), **step_kwargs)

    return TrainFunctions(
        init=init, train_step=step_for_loss(loss_fn),
        eval_step=train_lib.make_eval_step(loss_fn), init_params=init_params,
        loss_fn=loss_fn, model_config=model_config, schedule=schedule, tx=tx,
        loss_scale=loss_scale,
        eval_params=step_kwargs.get("eval_params", train_lib.params_of),
        step_for_loss=step_for_loss)


# Folded into the seed for Sophia's sampled labels / Rademacher signs, so they are a stream
# of their own (not the init's or the data's keys).
SOPHIA_STREAM = 0x50F1A


def sophia_update_args(config, model, seed=None):
    """`update_args(params, batch, step)` for Sophia: `{"hessian_fn": fn}`, the estimator of
    `config.optimizer.estimator` (GNB by default) on the step's first micro-batch.

    Sophia calls `fn` only on refresh steps (inside its `lax.cond`). GNB's estimate is
    scaled by the tokens of the whole optimizer step (grad_accum x batch_size x seq_len),
    as the official code's `bs = total_bs * block_size`; it is taken on the step's own
    first micro-batch rather than a separate one (the official loop draws a fresh batch).
    The labels / signs come from `fold_in(fold_in(key(seed), SOPHIA_STREAM), step)`, so a
    resumed run draws the same ones; `seed` (default config.seed) may be traced (a sweep's).
    """
    estimator = config.optimizer.get("estimator") or "gnb"
    seed = config.seed if seed is None else seed
    base_key = jax.random.fold_in(jax.random.key(seed), SOPHIA_STREAM)
    step_tokens = config.grad_accum * config.batch_size * config.seq_len
    loss_fn = train_lib.lm_loss(model)

    def logits_fn(params, inputs):
        return model.apply({"params": params}, inputs)

    def update_args(params, batch, step):
        del params  # Sophia passes the params it is at to hessian_fn
        key = jax.random.fold_in(base_key, step)
        tokens = batch[0].astype(jnp.int32)  # [B, T + 1]

        def hessian_fn(params):
            if estimator == "hutchinson":
                return sophia_estimates.hutchinson(lambda p: loss_fn(p, tokens), params, key)
            grads, _ = sophia_estimates.gnb_gradient(logits_fn, params, tokens[:, :-1], key)
            return sophia_estimates.gnb_from_gradient(grads, step_tokens)

        return {"hessian_fn": hessian_fn}

    return update_args


def _schedule_free_eval_params(params, opt_state):
    return optim.schedule_free_eval_params(opt_state, params)


def optimizer_step_kwargs(config, model, seed=None):
    """What `train_lib.make_train_step` needs beyond the loss and the optimizer: Sophia's
    `update_args` (keys from `seed`, default config.seed) and Schedule-Free's `eval_params`
    (x); `{}` for the others."""
    name = config.optimizer.name
    if name == "sophia":
        return {"update_args": sophia_update_args(config, model, seed)}
    if name == "schedule_free_adamw":
        return {"eval_params": _schedule_free_eval_params}
    return {}


def _register_kfac():
    from ravine.experiments import kfac  # noqa: PLC0415 - kfac's train functions build on this module
    register_train_step("kfac", kfac.make_train_functions)


_register_kfac()
