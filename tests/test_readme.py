"""The README's Python snippets run as a newcomer copies them."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SNIPPETS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, capsys):
    namespace = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
    if "train_step" in namespace:  # the tour trains a linear model to its optimum
        assert float(namespace["loss"]) < 1e-4


# ----------------------------------------------------------------------------- commands
# Every `python -m ravine.experiments.<module> --flag...` the README shows uses flags that module
# defines (read from its source: importing every script in one process would define
# --config twice), and every `--config.<field>` is a field of the LM config.

ROOT = os.path.dirname(README)
TEXT = open(README).read()


def console_scripts():
    """{script name: module under ravine} of pyproject.toml's [project.scripts]."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return {name: target.split(":")[0].removeprefix("ravine.")
            for name, target in scripts.items()}


def readme_commands():
    """(module, [flag names]) of each command in the README, continuation lines joined."""
    joined = TEXT.replace("\\\n", " ")
    found = []
    # `python -m ravine.experiments.<job>` or the console script `ravine-<job>`
    pattern = r"(?:python -m ravine\.(experiments[\w.]*)|\bravine-([a-z_-]+))([^`\n|]*)"
    for match in re.finditer(pattern, joined):
        module = match.group(1) or console_scripts()[f"ravine-{match.group(2)}"]
        names = re.findall(r"(?<!\S)--([\w.]+)", match.group(3))
        found.append((module, names))
    return found


def defined_flags(module):
    """The flag names a script defines: its own DEFINE_* calls plus the shared helpers it
    calls (the demos' output flags, the train job's --config / --workdir / --multihost)."""
    source = open(os.path.join(ROOT, *module.split(".")) + ".py").read()
    names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    # a flag defined through a helper: `_flag(flags.DEFINE_string, "preset", ...)`
    names |= set(re.findall(r"DEFINE_\w+,\s*\"(\w+)\"", source))
    names |= set(re.findall(r"define_number_list\(\s*\"(\w+)\"", source))
    if "define_output_flags" in source:
        names |= {"outdir", "dpi"}
    if "define_flags(" in source:
        names |= {"config", "workdir", "multihost", "optimizer_module"}
    return names


def test_readme_commands_use_flags_their_scripts_define():
    from ravine.experiments.configs import lm
    config = lm.get_config("small")
    commands = readme_commands()
    assert {"experiments.train", "experiments.race"} <= {module for module, _ in commands}
    for module, names in commands:
        defined = defined_flags(module)
        for name in names:
            if name.startswith("config."):
                target = config
                for part in name.split(".")[1:]:
                    assert part in target, (module, name)
                    target = target[part]
            else:
                assert name in defined, (module, name, sorted(defined))


def test_readme_demo_flags_are_the_demos_flags():
    """Flags the demos section names (e.g. where the PNG goes) are defined by every demo."""
    section = TEXT.split("## Demos", 1)[1].split("\n## ", 1)[0]
    mentioned = set(re.findall(r"`--(\w+)", section))
    assert mentioned
    demos = [m for m, _ in readme_commands() if m.startswith("experiments.demos.")]
    assert len(demos) >= 5
    for module in demos:
        assert mentioned <= defined_flags(module), (module, mentioned)


def test_sharding_usage_example_runs():
    """sharding/__init__.py's usage example, given a batch: every name it uses is defined."""
    import numpy as np

    from ravine import sharding
    block = sharding.__doc__.split("::\n\n", 1)[1].split("\n\nZeRO stages")[0]
    code = "\n".join(line[4:] for line in block.splitlines())
    tokens = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
    namespace = {"data": [tokens]}
    exec(compile(code, "sharding/__init__.py example", "exec"), namespace)
    assert 5.0 < float(namespace["metrics"]["loss"]) < 6.0  # about ln(256) at init


@pytest.mark.slow
def test_readme_race_command_shapes_take_config_fields(tmp_path, monkeypatch, capfd):
    """`--config.<field>` works with and without `--config` (the README's and `make demo`'s
    shapes): a bad field value reaches the config and exits 2 naming it."""
    import subprocess
    import sys

    from ravine.experiments import race
    from tests.scripts import run_main
    shapes = [names for module, names in readme_commands() if module == "experiments.race"]
    assert shapes
    flags = ["--optimizers=adamw,lion", f"--workdir={tmp_path}/race", "--config.steps=0"]
    # Without --config, ml_collections defines the `--config.<field>` flags when the race
    # module defines --config, at its import: that takes a new process.
    done = subprocess.run(
        [sys.executable, "-m", "ravine.experiments.race", *flags],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300)
    exits = [(done.returncode, done.stderr)]
    # With --config, it defines them while it parses --config: the command runs in this
    # process (tests/scripts.py's `run_main`; a process costs 3-4 s of imports).
    monkeypatch.chdir(ROOT)
    status, _, err = run_main(race, ["--config=experiments/configs/lm.py:tiny", *flags], capfd)
    exits.append((status, err))
    for status, err in exits:
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err[-2000:]
        assert "config.steps must be a positive integer, got 0" in lines[0]
