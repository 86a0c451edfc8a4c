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
