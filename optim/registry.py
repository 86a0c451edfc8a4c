"""Build any optimizer by name: `create("adamw", learning_rate=3e-4)`."""
import importlib
import inspect

_NAMES = ("sgd", "adagrad", "rmsprop", "adam", "adamw", "lion", "adafactor",
          "shampoo", "soap", "muon")


def available():
    """The names `create` accepts."""
    return list(_NAMES)


def create(name, **hparams):
    """Returns `optim.<name>(**hparams)`; ValueError for an unknown name or hyperparameter."""
    if name not in _NAMES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(_NAMES)}")
    factory = getattr(importlib.import_module("optim"), name)
    known = inspect.signature(factory).parameters
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; "
                         f"known: {', '.join(known)}")
    return factory(**hparams)
