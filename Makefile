# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,kfac]'
	$(PY) -m pip install -q -e '.[wandb]' || echo "wandb did not install: its offline test is skipped"
	touch $(STAMP)

# The race's demo workload: the tiny LM (140k params) for 150 steps of 16 x 64 bytes, two
# eval batches every 7 steps; 5 optimizers x 5 lrs (extended past an edge up to 9), then 3
# new seeds at each one's best lr and its two neighbours.
demo: $(STAMP)
	$(VENV)/bin/ravine-race --workdir=runs/demo --config.steps=150 --config.eval_batches=2

# -n 2: CI has 2 cores; each worker emulates 8 CPU devices (tests/conftest.py). Whole files
# go to a worker in collection order (heaviest first, tests/conftest.py): xdist would
# otherwise reorder them by their number of tests and leave a heavy file for last.
PYTEST := $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) runs
