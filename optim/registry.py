"""One registry of optimizers: each is a record (`OptimizerSpec`) of its factory and its needs.

`create("adamw", learning_rate=3e-4)` builds any registered optimizer by name. `register`
adds one, with whatever the training runtime must know of it beyond its factory: the race's
learning-rate centre, whether several runs can share one vmapped program, extra `update`
arguments, the params to evaluate at, schedule constraints, config it cannot take, a train
step of its own. The runtime (train job, sweep, race, benchmark) asks the record and never
compares names, so a new optimizer touches one file:

    def my_sgd(learning_rate, momentum=0.9):
        return optax.sgd(learning_rate, momentum=momentum)

    optim.register("my_sgd", my_sgd, centre_lr=0.1)
    tx = optim.create("my_sgd", learning_rate=0.1)
    optim.spec("my_sgd").centre_lr    # 0.1

After that `optim.available()` lists "my_sgd", `optim.factory("my_sgd")` returns the function
and `getattr(optim, "my_sgd")` finds it too (scripts look factories up on the package). The
built-in optimizers declare their records the same way, in optim/builtin_specs.py. Levanter's
`OptimizerConfig` registry is the model: https://github.com/stanford-crfm/levanter.
"""
import inspect
import keyword
import math
from typing import Any, Callable, Mapping, NamedTuple

import optax


class OptimizerSpec(NamedTuple):
    """An optimizer and what the training runtime needs to know of it.

    Attributes:
      name: the registered name (`config.optimizer.name`, `--optimizers=...`).
      factory: `factory(learning_rate, **hparams)`, an `optax.GradientTransformation`
        (or, for an optimizer with its own `train_step`, whatever that step uses).
      centre_lr: a good peak learning rate on the race's default workload (the tiny LM,
        warmup-cosine): the centre of the race's learning-rate grid.
      vmappable: whether runs with different learning rates and seeds can share one
        vmapped program (False for an extra update argument, a train step of its own, or
        a program that XLA runs badly batched: Kron's LAPACK solves on CPU).
      eval_params: `(params, opt_state) -> params` to evaluate and average at (Schedule-
        Free's x), `opt_state` being the state of the factory's transform; None: the params
        themselves.
      update_args: `(hparams, task) -> update_args`, where `update_args(params, batch,
        step) -> dict` gives extra keyword arguments of `update` (Sophia's Hessian
        estimator); `task` is a `TrainTask`, `batch` the step's first micro-batch.
      constant_lr: the optimizer takes a constant learning rate (Schedule-Free); the train
        job refuses another schedule, the race gives it a constant one.
      warmup_hparam: the optimizer's own warmup argument, which takes over the schedule's
        `warmup_steps` in the race (Schedule-Free's `warmup_steps`).
      train_step: `make(config) -> TrainFunctions` for an optimizer that is not an Optax
        transform and brings its own step (K-FAC); it is then left out of `available()`.
      unsupported: `{config field: the value it must take}` for settings the optimizer
        cannot honour (K-FAC: `clip_norm` 0); the train job and the race set them, with one
        warning line each, rather than fail or silently differ.
      race_hparams: hyperparameters the race sets for it (Muon's AdamW leaves' peak lr).
      search_space: the benchmark's extra tuning knobs, `{hparam: (low, high, "log" |
        "linear")}`, beyond lr, weight decay, warmup and b2 (where the factory takes them).
    """
    name: str
    factory: Callable[..., Any]
    centre_lr: float = 1e-3
    vmappable: bool = True
    eval_params: Callable[[Any, Any], Any] | None = None
    update_args: Callable[[Mapping[str, Any], Any], Callable[..., dict]] | None = None
    constant_lr: bool = False
    warmup_hparam: str | None = None
    train_step: Callable[[Any], Any] | None = None
    unsupported: Mapping[str, Any] = {}
    race_hparams: Mapping[str, Any] = {}
    search_space: Mapping[str, tuple] = {}

    @property
    def is_transform(self) -> bool:
        """Whether `create` gives an Optax transform the runtime's own step can drive."""
        return self.train_step is None

    def pipeline_blocker(self) -> str | None:
        """Why the pipeline's per-layer split of the optimizer state cannot take it, or None."""
        if not self.is_transform:
            return "it brings its own train step, which registers the model's layers itself"
        if self.update_args is not None:
            return "its update takes extra arguments, which the per-layer split does not split"
        if self.eval_params is not None:
            return "its eval params come from its whole state, which the per-layer split cuts"
        return None


class TrainTask(NamedTuple):
    """What an optimizer's `update_args` may use of the task being trained.

    Attributes:
      loss_fn: `(params, batch) -> scalar` mean loss of a micro-batch.
      logits_fn: `(params, batch) -> logits[..., classes]` of the batch's inputs.
      examples_per_step: loss terms one optimizer step averages (tokens, for an LM).
      key: the run's random key (may be traced, in a sweep); fold in a stream of your own.
    """
    loss_fn: Callable[[Any, Any], Any]
    logits_fn: Callable[[Any, Any], Any]
    examples_per_step: int
    key: Any


SPEC_FIELDS = tuple(f for f in OptimizerSpec._fields if f not in ("name", "factory"))
_SPECS: dict[str, OptimizerSpec] = {}   # name -> record, in registration order
_BUILTIN: set[str] = set()              # ravine's own names (optim/builtin_specs.py)


def _check_spec(name: str, spec: Mapping[str, Any]) -> None:
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"unknown spec field(s) {unknown} for optimizer {name!r}; known: "
                         f"{', '.join(SPEC_FIELDS)}")
    lr = spec.get("centre_lr", 1e-3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
            lr > 0 and math.isfinite(lr)):
        raise ValueError(f"centre_lr of optimizer {name!r} must be a positive number, "
                         f"got {lr!r}")
    for field in ("eval_params", "update_args", "train_step"):
        if spec.get(field) is not None and not callable(spec[field]):
            raise ValueError(f"{field} of optimizer {name!r} must be callable or None, "
                             f"got {spec[field]!r}")
    for field in ("unsupported", "race_hparams", "search_space"):
        if not isinstance(spec.get(field, {}), Mapping):
            raise ValueError(f"{field} of optimizer {name!r} must be a mapping, "
                             f"got {spec[field]!r}")
    for knob, space in spec.get("search_space", {}).items():
        if (not isinstance(space, tuple) or len(space) != 3 or space[2] not in ("log", "linear")
                or not space[0] < space[1]):
            raise ValueError(f"search_space[{knob!r}] of optimizer {name!r} must be "
                             f"(low, high, 'log' | 'linear') with low < high, got {space!r}")


def register(name: str, factory: Callable[..., Any], **spec: Any) -> Callable[..., Any]:
    """Makes `factory` buildable as `create(name, ...)`, with the needs `spec` declares.

    Args:
      name: a new identifier (not a taken name, not a Python keyword).
      factory: `factory(learning_rate, **hparams) -> optax.GradientTransformation`. Its
        keyword arguments are the hyperparameters `create` (and the train config,
        `--config.optimizer.<hparam>`) accept. It must accept a traced `learning_rate`:
        sweeps feed learning rates as data (`optax.inject_hyperparams`).
      **spec: fields of `OptimizerSpec` (`centre_lr`, `vmappable`, `eval_params`,
        `update_args`, `constant_lr`, `warmup_hparam`, `train_step`, `unsupported`,
        `race_hparams`, `search_space`); the rest keep their defaults.

    Returns:
      `factory`, so `functools.partial(register, name)` also works as a decorator.

    Raises:
      ValueError: a bad or taken name, a factory without `learning_rate`, an unknown or
        bad spec field.
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"optimizer name must be a Python identifier, got {name!r}")
    if name in _SPECS:
        raise ValueError(f"optimizer name {name!r} is already taken; taken: "
                         f"{', '.join(_SPECS)}")
    if not callable(factory):
        raise ValueError(f"factory for {name!r} must be callable, got {factory!r}")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = None
    if parameters is not None and "learning_rate" not in parameters:
        raise ValueError(f"factory for {name!r} must take a learning_rate argument; it takes "
                         f"({', '.join(parameters)})")
    _check_spec(name, spec)
    if spec.get("update_args") is not None or spec.get("train_step") is not None:
        spec.setdefault("vmappable", False)
    _SPECS[name] = OptimizerSpec(name=name, factory=factory, **spec)
    return factory


def register_builtin(name: str, factory: Callable[..., Any], **spec: Any) -> None:
    """`register` for ravine's own optimizers (optim/builtin_specs.py); never unregistered."""
    register(name, factory, **spec)
    _BUILTIN.add(name)


def unregister(name: str) -> None:
    """Removes a name added by `register` (built-in names cannot be removed)."""
    if name not in _SPECS or name in _BUILTIN:
        user = [n for n in _SPECS if n not in _BUILTIN]
        raise ValueError(f"{name!r} was not added by register; registered: "
                         f"{', '.join(user) or 'none'}")
    del _SPECS[name]


def spec(name: str) -> OptimizerSpec:
    """The record of optimizer `name`; ValueError listing the known names otherwise."""
    if name not in _SPECS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(_SPECS)}")
    return _SPECS[name]


def specs() -> list[OptimizerSpec]:
    """Every record, in registration order: the Optax transforms and those with a train
    step of their own (K-FAC, once `ravine.experiments` registered it)."""
    return list(_SPECS.values())


def available() -> list[str]:
    """The names `create` builds Optax transforms for: built-ins, then registered ones."""
    return [s.name for s in _SPECS.values() if s.is_transform]


def factory(name: str) -> Callable[..., Any]:
    """The function `create(name, ...)` calls; ValueError listing the known names otherwise."""
    return spec(name).factory


def registered(name: str) -> Callable[..., Any] | None:
    """The factory of a user-registered `name`, or None (used by `optim.__getattr__`)."""
    found = _SPECS.get(name)
    return None if found is None or name in _BUILTIN else found.factory


def create(name: str, **hparams: Any) -> optax.GradientTransformation:
    """Returns `factory(name)(**hparams)`; ValueError for an unknown name or hyperparameter."""
    build = factory(name)
    known = inspect.signature(build).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in known.values())
    unknown = sorted(set(hparams) - set(known))
    if unknown and not takes_any:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; "
                         f"known: {', '.join(known)}")
    return build(**hparams)
