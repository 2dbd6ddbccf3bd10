# Two commands on a fresh machine (python3 >= 3.11 on PATH):
#   make run    install, then train the main experiment on offline data
#   make test   install, then run the test suite (fast tests; `make test-slow` for long runs)
# `make test-py312`: install check in a fresh Python 3.12 venv with the newest
# releases the dependency ranges admit (downloads them; see .ci/py312_smoke.sh).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/mnist_vit

.PHONY: install run test test-slow test-py312 clean

# This checkout as an editable package with its [cpu] and [test] extras, at
# the versions CI tests (constraints.txt).
$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) run.py --experiment=mnist_vit --workdir=$(WORKDIR)

# The suite on every core, at most four workers (each holds its own JAX and
# TensorFlow); `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= auto
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses=4 --dist worksteal

test-slow: install
	$(PY) -m pytest -q -m slow

test-py312:
	.ci/py312_smoke.sh

clean:
	rm -rf $(VENV) runs
