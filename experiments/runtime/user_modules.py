"""`--optimizer_module=my_opt`: import a user's module (which calls `optim.register`) first.

    # my_opt.py, next to where you run the scripts
    import optax, optim

    def my_sgd(learning_rate, momentum=0.9):
        return optax.sgd(learning_rate, momentum=momentum)

    optim.register("my_sgd", my_sgd)

    python -m ravine.experiments.train --optimizer_module=my_opt --config.optimizer.name=my_sgd \
        --config.optimizer.momentum=0.8 --workdir=runs/mine

The train config makes a field of every keyword argument of every optimizer it knows
(`config.optimizer.<hparam>`) when the config file is loaded, which ml_collections does
while the flags are being defined, before absl parses them. So the module is imported
from the raw command line (`sys.argv`) by `define_and_import`, which the train job and
the race call just before they define `--config`. The value is a module name (found on
`sys.path`, which starts with the current folder under `python -m`), a `path/to/file.py`,
or a comma-separated list of either; a module that fails to import exits 2 naming it.
"""
import importlib
import importlib.util
import os
import sys

from absl import flags

from ravine.experiments.runtime import cli

FLAG = "optimizer_module"


def names_in(argv):
    """The module names given with `--optimizer_module` in `argv` (both `--flag=value` and
    `--flag value` forms; later ones add to earlier ones)."""
    names = []
    for i, arg in enumerate(argv):
        for prefix in (f"--{FLAG}", f"-{FLAG}"):
            if arg.startswith(prefix + "="):
                value = arg[len(prefix) + 1:]
            elif arg == prefix and i + 1 < len(argv):
                value = argv[i + 1]
            else:
                continue
            names += [name.strip() for name in value.split(",") if name.strip()]
    return names


def import_user_module(name):
    """Imports module `name` or the file `name` (ending in .py); returns the module."""
    if name.endswith(".py") or os.sep in name:
        module_name = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(module_name, name)
        if spec is None or not os.path.isfile(name):
            raise ImportError(f"no file {name!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the current folder first
    return importlib.import_module(name)


def define_and_import(argv=None):
    """Defines `--optimizer_module` (once) and imports the modules `argv` (default
    `sys.argv`) names; one that fails to import exits 2 with one line naming it."""
    if FLAG not in flags.FLAGS:
        flags.DEFINE_list(FLAG, [], "Modules to import before the config is built (e.g. one "
                          "that calls optim.register); names or .py paths, comma-separated.")
    for name in names_in(sys.argv if argv is None else argv):
        try:
            import_user_module(name)
        except Exception as error:  # noqa: BLE001 - whatever the user's module raised
            cli.fail(f"--{FLAG}={name}: {type(error).__name__}: {error}")
