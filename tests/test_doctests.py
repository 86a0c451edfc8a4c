"""Docs that cannot drift: the `>>>` examples of ravine.optim, ravine.models and
ravine.sharding run here, and their public functions carry type hints (optax's style).

Each module is imported by its one name (`ravine.optim.alias`, ...) and its examples are run
with the standard `doctest` module. Not pytest's `--doctest-modules`: the repository root is
itself the package `ravine`, so pytest would import these files a second time under other
names (`optim.alias`). For the same reason an example may not import ravine's folders under
their bare names (`import optim`): that works only from the repository root, and loads a
second copy of the package; examples write `from ravine import optim`.
"""
import doctest
import importlib
import inspect
import pkgutil
import sys

import pytest

from ravine import models, optim, sharding

PACKAGES = (optim, models, sharding)
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# The repository's top-level folders: importable by these names only from the repo root.
BARE_NAMES = ("optim", "models", "sharding", "experiments")


def _module_names():
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        names += [info.name for info in
                  pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(names)


MODULES = _module_names()

# Modules whose examples still fail, in files other work is changing now; remove an entry
# once its examples pass (strict: a passing example fails the mark).
DOCTEST_XFAIL = {}


def _marked(names, xfails):
    return [pytest.param(name, id=name, marks=pytest.mark.xfail(strict=True, reason=xfails[name]))
            if name in xfails else pytest.param(name, id=name) for name in names]


def _example_lines(module):
    """The number of `>>>` lines in the module's source: each starts one example."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return 0
    return sum(line.lstrip().startswith(">>>") for line in source.splitlines())


def test_every_package_is_walked():
    for name in ("ravine.optim.alias", "ravine.optim.kron", "ravine.models.transformer",
                 "ravine.sharding.mesh"):
        assert name in MODULES


@pytest.mark.parametrize("name", _marked(MODULES, DOCTEST_XFAIL))
def test_doctests(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report = []
    before = set(sys.modules)
    try:
        for test in finder.find(module, name):
            runner.run(test, out=report.append)
    finally:
        second_copies = sorted(n for n in set(sys.modules) - before
                               if n.split(".")[0] in BARE_NAMES)
        for n in second_copies:  # leave no second copy behind for later tests
            del sys.modules[n]
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    assert not second_copies, (
        f"{name}'s examples imported ravine's modules under a second name: {second_copies}; "
        f"write `from ravine import optim` (models, sharding)")
    # Every `>>>` line is an example that ran: none hides where doctest does not look.
    expected = _example_lines(module)
    assert results.attempted == expected, (
        f"{name}: {expected} `>>>` lines in its source but {results.attempted} examples ran")


# --- Type hints -----------------------------------------------------------------------------

# The factories of `optim.available()` (and the other public functions below) whose
# annotations are still missing, in files other work is changing now; remove an entry once
# annotated (strict: an annotated function fails the mark).
FACTORY_XFAIL = {}


@pytest.mark.parametrize("name", _marked(optim.available(), FACTORY_XFAIL))
def test_factory_has_return_annotation(name):
    signature = inspect.signature(optim.factory(name))
    assert signature.return_annotation is not inspect.Signature.empty, name


def _public_functions(module):
    """(qualified name, function) of the module's own public functions and of the public
    methods and properties of its public classes."""
    found = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            found.append((attr, value))
        elif inspect.isclass(value):
            for member, item in vars(value).items():
                if member.startswith("_"):
                    continue
                if isinstance(item, property):
                    item = item.fget
                if inspect.isfunction(item) and item.__module__ == module.__name__:
                    found.append((f"{attr}.{member}", item))
    return found


def _missing_annotations(function):
    signature = inspect.signature(function)
    missing = [p.name for p in signature.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if signature.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


# Public modules (no `_` in the path) whose public functions are not all annotated yet.
ANNOTATION_XFAIL = {}
PUBLIC_MODULES = [name for name in MODULES
                  if not any(part.startswith("_") for part in name.split("."))]


@pytest.mark.parametrize("name", _marked(PUBLIC_MODULES, ANNOTATION_XFAIL))
def test_public_functions_are_annotated(name):
    module = importlib.import_module(name)
    missing = {qualname: names for qualname, function in _public_functions(module)
               if (names := _missing_annotations(function))}
    assert not missing, f"{name}: public functions lacking type hints: {missing}"
