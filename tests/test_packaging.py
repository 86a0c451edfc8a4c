"""One import name: the distribution installs `ravine` only; no import cycles; no module
loaded twice; a user's own `models.py` / `optim.py` next to their script breaks nothing."""
import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys
import tomllib

import pytest

import ravine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("optim", "models", "sharding", "experiments")


def ravine_modules():
    """Every module of the distribution, by its one name (`ravine.optim.alias`, ...)."""
    names = []
    for sub in LIBRARY:
        package = importlib.import_module(f"ravine.{sub}")
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__,
                                                              package.__name__ + ".")]
    return names


def test_pyproject_lists_every_package_under_the_one_name():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"ravine": "."}
    folders = sorted("ravine." + os.path.relpath(folder, ROOT).replace(os.sep, ".")
                     for sub in LIBRARY for folder, _, files in os.walk(os.path.join(ROOT, sub))
                     if "__init__.py" in files)
    assert sorted(setuptools["packages"]) == ["ravine"] + folders


def _imports(module_name):
    """The ravine modules `module_name`'s source imports (at any depth of its code), and
    whether any of them is imported inside a function."""
    spec = importlib.util.find_spec(module_name)
    tree = ast.parse(open(spec.origin).read())
    package = module_name if spec.submodule_search_locations else module_name.rpartition(".")[0]
    found, in_function = set(), []

    def visit(node, depth):
        for child in ast.iter_child_nodes(node):
            inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative
                    parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` depends on pkg.mod when that is a module. Only
                # ravine's count (below): another base's names are not looked up (its
                # find_spec would import it: scipy.stats alone is seconds).
                if base == "ravine" or base.startswith("ravine."):
                    names = [f"{base}.{alias.name}" if importlib.util.find_spec(base)
                             .submodule_search_locations and _is_module(f"{base}.{alias.name}")
                             else base for alias in child.names]
            for name in names:
                if name.startswith("ravine."):
                    found.add(name)
                    if inner:
                        in_function.append(name)
            visit(child, inner)

    visit(tree, 0)
    return found, in_function


def _is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_import_graph_has_no_cycle_and_no_import_hidden_in_a_function():
    modules = ravine_modules()
    graph, hidden = {}, {}
    for name in modules:
        graph[name], in_function = _imports(name)
        if in_function:
            hidden[name] = in_function
    assert not hidden, f"imports inside functions: {hidden}"
    # depth-first search for a back edge
    state, stack = {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        stack.pop()
        state[node] = "done"

    for name in modules:
        if name not in state:
            walk(name)
    # the runtime never imports an entry point, and optim imports nothing of the others
    entries = {"ravine.experiments.train", "ravine.experiments.race",
               "ravine.experiments.prepare_data"}
    for name in modules:
        if name.startswith("ravine.experiments.runtime"):
            assert not graph[name] & entries, name
        if name.startswith("ravine.optim"):
            assert all(t.startswith("ravine.optim") for t in graph[name]), name


@pytest.mark.slow
def test_a_users_own_models_and_optim_modules_break_nothing(tmp_path):
    """From a folder holding its own models.py, optim.py and experiments/, ravine imports
    and trains; only `ravine` is a top-level name of the distribution; no module of it is
    ever loaded under a second name."""
    (tmp_path / "models.py").write_text("raise ImportError('the user\\'s models.py')\n")
    (tmp_path / "optim.py").write_text("raise ImportError('the user\\'s optim.py')\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("raise ImportError('mine')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    check = subprocess.run([sys.executable, "-c", """
import importlib.util, os, sys
from ravine import optim, models, sharding, experiments
import ravine.experiments.train, ravine.experiments.race
assert optim.available() and models.TransformerConfig and sharding.make_mesh
os.chdir(os.path.dirname(os.getcwd()))  # away from the user's files
sys.path = [p for p in sys.path if p not in ("", %r)]
assert importlib.util.find_spec("models") is None, importlib.util.find_spec("models")
assert importlib.util.find_spec("optim") is None and importlib.util.find_spec("sharding") is None
twice = [m for m in sys.modules if m.split(".")[0] in ("optim", "models", "sharding", "experiments")]
assert not twice, twice
print("ok")
""" % str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr[-2000:]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text to learn " * 300)
    script = os.path.join(os.path.dirname(sys.executable), "ravine-train")
    done = subprocess.run(
        [script, "--config=" + os.path.join(ROOT, "experiments/configs/lm.py") + ":tiny",
         f"--workdir={tmp_path / 'run'}", f"--config.corpus={tmp_path / 'docs'}",
         "--config.steps=2", "--config.schedule.warmup_steps=1", "--config.batch_size=8",
         "--config.seq_len=32",
         "--config.eval_every=2", "--config.eval_batches=1", "--config.log_every=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_the_package_is_its_one_name():
    assert ravine.__name__ == "ravine" and sorted(ravine.__all__) == sorted(LIBRARY)
