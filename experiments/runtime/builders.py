"""Where a config becomes objects: validation, model, schedule, optimizer, loss scale, step.

Everything here is pure (no files, no devices touched, no mesh): the train job, the race's
sweeps and anything else that trains from an `experiments/configs/lm.py` config build their
pieces here, so a flag means the same thing everywhere.

    from ravine.experiments.runtime import builders
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
import copy
import dataclasses
import inspect
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine import sharding
from ravine.experiments.runtime import profiling, token_files, train_lib, writers
from ravine.models import pipeline
from ravine.optim import _validate, schedules

LOSS_SCALES = ("auto", "none", "dynamic")
SCHEDULES = ("constant", "linear", "warmup_cosine", "wsd", "cosine_restarts", "inverse_sqrt")
# Fields of `config.optimizer` that are not keyword arguments of the optimizer.
NON_HPARAM_KEYS = ("name", "no_decay", "muon_exclude")


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
    check_schedule(config)
    if not isinstance(config.init_from, str):
        raise ValueError(f"config.init_from must be DIR or DIR:STEP, got {config.init_from!r}")
    check_precision(config)
    profiling.parse_steps(config.get("profile_steps", ""))
    writers.validate(config)


# The smallest positive normal float16: an epsilon below it is lost in float16 arithmetic.
FLOAT16_TINY = float(np.finfo(np.float16).tiny)


def check_precision(config):
    """Refuses float16 params with an optimizer whose epsilon float16 cannot hold, and
    float8 matmuls (`matmul=fp8`), whose scales the train step does not carry.

    Optax-style optimizers keep their moments in the params' dtype, so with float16 params
    Adam's `sqrt(v) + eps` is computed in float16: eps = 1e-8 underflows to 0 and the
    first small gradient divides by zero (NaN from step 2, measured on the tiny LM).
    """
    policy = models.get_policy(config.precision)
    if policy.matmul == "fp8":
        # The train step would drop the fp8 scales (the flax collection FP8_COLLECTION that
        # must be overwritten, not optimized); only the precision_limits demo carries them.
        raise ValueError(f"config.precision={config.precision!r}: matmul=fp8 is not supported "
                         "by the train job yet (see experiments/demos/precision_limits.py)")
    if np.dtype(policy.param_dtype) != np.float16:
        return
    factory = optimizer_spec(config).factory
    if "eps" not in inspect.signature(factory).parameters:
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


def optimizer_spec(config):
    """`optim.spec(config.optimizer.name)`: what the runtime needs of the optimizer."""
    return optim.spec(config.optimizer.name)


def check_schedule(config):
    """An optimizer that replaces the schedule (`spec.constant_lr`, Schedule-Free AdamW)
    takes a constant learning rate, warmed up by its own warmup argument: any other schedule
    is refused."""
    spec = optimizer_spec(config)
    if not spec.constant_lr or config.schedule.name == "constant":
        return
    warmup = (f"; warm up with --config.optimizer.{spec.warmup_hparam}=N"
              if spec.warmup_hparam else "")
    raise ValueError(
        f"config.schedule.name={config.schedule.name!r}: {spec.name} takes a constant "
        "learning rate (--config.schedule.name=constant --config.schedule.warmup_steps=None"
        f"{warmup})")


_WARNED = set()  # (optimizer, field, value) said by adapt_to_optimizer in this process


def adapt_to_optimizer(config, warn=True):
    """`config` with the fields its optimizer cannot honour (`spec.unsupported`, e.g. K-FAC's
    `clip_norm`) set to the values it runs with; one warning line on stderr per field
    changed. The train job and the race both run this, so both train the same thing."""
    spec = optimizer_spec(config)
    changed = {field: value for field, value in spec.unsupported.items()
               if config[field] != value}
    if not changed:
        return config
    config = copy.deepcopy(config)
    for field, value in changed.items():
        if warn and (spec.name, field, value) not in _WARNED:  # once per process
            _WARNED.add((spec.name, field, value))
            print(f"warning: optimizer {spec.name} does not support config.{field}="
                  f"{config[field]!r}; running with {value!r}", file=sys.stderr, flush=True)
        config[field] = value
    return config


def build_schedule(config):
    """`optim.schedules.<schedule.name>(**args)` from the schedule fields that are set;
    `peak_value` (`value` for constant) defaults to optimizer.learning_rate and
    `total_steps` to steps."""
    name = config.schedule.name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
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
    every field but `NON_HPARAM_KEYS`, dtype names (`"bfloat16"`) turned into dtypes."""
    cfg = config.optimizer
    accepted = inspect.signature(optimizer_spec(config).factory).parameters
    hparams = {}
    for key, value in cfg.items():
        if key in NON_HPARAM_KEYS or value is None:
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
    spec = optimizer_spec(config)
    if not spec.is_transform:
        raise ValueError(f"optimizer {name!r} brings its own train step; it has no Optax "
                         "transform to build")
    accepted = inspect.signature(spec.factory).parameters
    hparams = optimizer_hparams(config)
    hparams["learning_rate"] = schedule
    for key, peak in list(hparams.items()):
        if key.endswith("_learning_rate") and isinstance(peak, (int, float)):
            # A second learning rate (Muon's AdamW leaves' adam_learning_rate) follows the
            # same schedule shape, peaking at its own value.
            hparams[key] = scaled_schedule(schedule, peak, cfg.learning_rate, key)
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
        blocker = spec.pipeline_blocker()
        if blocker:
            raise ValueError(f"optimizer {name!r} cannot run with pipeline stages: {blocker}; "
                             "use stage=1 or another optimizer")
        tx = pipeline.per_layer(tx)  # stacked blocks: the layer axis is a batch axis
    return train_lib.with_clipping(tx, config.clip_norm)


def scaled_schedule(schedule, peak, base_peak, name):
    """`schedule`'s shape peaking at `peak` instead of `base_peak` (for a second learning
    rate); `schedule` itself when `base_peak` is 0 (a sweep's traced lr sets it so)."""
    _validate.learning_rate(peak, f"config.optimizer.{name}")
    if not base_peak:
        return schedule
    ratio = peak / base_peak

    def shaped(step):
        return ratio * schedule(step)

    shaped.peak_value = peak  # for weight_decay_mode="independent"
    return shaped


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
      init: `key -> state`, the train state at step 0 (see experiments/runtime/train_lib.py).
      train_step: `(state, batch[K, B, T + 1]) -> (state, metrics)`.
      eval_step: `(params, batch[K, B, T + 1]) -> mean loss`.
      init_params: `key -> boxed params` (flax logical-axis boxes, for shardings).
      loss_fn: `(params, tokens[B, T + 1]) -> loss`.
      model_config, schedule, tx, loss_scale: what they were built from.
      eval_params: `(params, opt_state) -> params` to evaluate at (Schedule-Free's x).
      step_for_loss: `loss_fn -> train_step`, the same step around another loss function
        (the train job's ZeRO-2/3 one, whose gradients are reduce-scattered); None for a
        step of its own (`OptimizerSpec.train_step`, K-FAC), which the train job then runs
        with ZeRO 0 or 1 only.
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
    spec = optimizer_spec(config)
    if tx is None and not spec.is_transform:
        # A step of its own (K-FAC): no ZeRO-2/3 variant around another loss function.
        return spec.train_step(config)._replace(step_for_loss=None)
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


def optimizer_step_kwargs(config, model, seed=None):
    """What `train_lib.make_train_step` needs of the optimizer beyond its transform, from its
    spec: `update_args` (Sophia's Hessian estimator; keys from `seed`, default config.seed,
    which may be traced in a sweep) and `eval_params` (Schedule-Free's x)."""
    spec = optimizer_spec(config)
    kwargs = {}
    if spec.update_args is not None:
        seed = config.seed if seed is None else seed
        task = optim.TrainTask(
            loss_fn=train_lib.lm_loss(model),
            logits_fn=lambda params, tokens: model.apply(
                {"params": params}, tokens[:, :-1].astype(jnp.int32)),
            examples_per_step=config.grad_accum * config.batch_size * config.seq_len,
            key=jax.random.key(seed))
        kwargs["update_args"] = spec.update_args(optimizer_hparams(config), task)
    if spec.eval_params is not None:
        kwargs["eval_params"] = eval_params_fn(config)
    return kwargs


def eval_params_fn(config):
    """`(params, opt_state) -> params` to evaluate at: the spec's `eval_params` handed the
    optimizer's own state (the runtime's clipping wraps it, see `build_optimizer`), or
    `train_lib.params_of` when the spec has none."""
    eval_params = optimizer_spec(config).eval_params
    if eval_params is None:
        return train_lib.params_of
    if not config.clip_norm:
        return eval_params

    def unclipped(params, opt_state):
        clip_state, own_state = opt_state  # optax.chain(clip_by_global_norm, tx)
        del clip_state
        return eval_params(params, own_state)

    return unclipped
