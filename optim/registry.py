"""Build any optimizer by name: `create("adamw", learning_rate=3e-4)`; add your own with `register`.

The built-in names resolve to the factories of the `optim` package. `register(name, factory)`
adds a user's factory, e.g. from a module imported before the train config is built:

    def my_sgd(learning_rate, momentum=0.9):
        return optax.sgd(learning_rate, momentum=momentum)

    optim.register("my_sgd", my_sgd)
    tx = optim.create("my_sgd", learning_rate=0.1)

After that, `optim.available()` lists "my_sgd", `optim.factory("my_sgd")` returns the
function, and `getattr(optim, "my_sgd")` finds it too (so scripts that look factories up on
the package, as the train config does, see it).
"""
import importlib
import inspect
import keyword

_BUILTIN = ("sgd", "adagrad", "rmsprop", "adam", "adamw", "lion", "adafactor",
            "shampoo", "soap", "muon",
            # --- issue 17: the rest of the Adam family ---
            "radam", "adamw_8bit", "sophia", "schedule_free_adamw")
_REGISTERED = {}  # name -> factory added by `register`


def available():
    """The names `create` accepts: the built-in optimizers, then registered ones in order."""
    return list(_BUILTIN) + list(_REGISTERED)


def register(name, factory):
    """Makes `factory` buildable as `create(name, ...)` and listed by `available()`.

    Args:
      name: a new identifier (not a built-in or already registered name, not a Python keyword).
      factory: a callable `factory(learning_rate, **hparams) -> optax.GradientTransformation`.
        Its keyword arguments are the hyperparameters `create` (and the train config,
        `--config.optimizer.<hparam>`) accept. It must accept a traced `learning_rate`: the
        race sweeps learning rates with `optax.inject_hyperparams`, which passes it as an array.

    Returns:
      `factory`, so `register` also works as `functools.partial(register, name)` decorator.

    Raises:
      ValueError: for a bad or taken name, or a factory without a `learning_rate` argument.
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"optimizer name must be a Python identifier, got {name!r}")
    if name in _BUILTIN or name in _REGISTERED:
        raise ValueError(f"optimizer name {name!r} is already taken; taken: "
                         f"{', '.join(available())}")
    if not callable(factory):
        raise ValueError(f"factory for {name!r} must be callable, got {factory!r}")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = None
    if parameters is not None and "learning_rate" not in parameters:
        raise ValueError(f"factory for {name!r} must take a learning_rate argument; it takes "
                         f"({', '.join(parameters)})")
    _REGISTERED[name] = factory
    return factory


def unregister(name):
    """Removes a name added by `register` (built-in names cannot be removed)."""
    if name not in _REGISTERED:
        raise ValueError(f"{name!r} was not added by register; registered: "
                         f"{', '.join(_REGISTERED) or 'none'}")
    del _REGISTERED[name]


def factory(name):
    """The function `create(name, ...)` calls; ValueError listing the known names otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return getattr(importlib.import_module("ravine.optim"), name)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(available())}")


def registered(name):
    """The user's factory registered as `name`, or None (used by `optim.__getattr__`)."""
    return _REGISTERED.get(name)


def create(name, **hparams):
    """Returns `factory(name)(**hparams)`; ValueError for an unknown name or hyperparameter."""
    build = factory(name)
    known = inspect.signature(build).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in known.values())
    unknown = sorted(set(hparams) - set(known))
    if unknown and not takes_any:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; "
                         f"known: {', '.join(known)}")
    return build(**hparams)
