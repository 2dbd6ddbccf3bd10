# Two commands on a fresh machine (python3 >= 3.10 on PATH):
#   make run    install, then train the main experiment on offline data
#   make test   install, then run the test suite (fast tests; `make test-slow` for long runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/mnist_vit

.PHONY: install run test test-slow clean

$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) run.py --experiment=mnist_vit --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
