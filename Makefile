# exo_lab — `make run` starts the demo; `make test` sets up and runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 52415
PYTEST_ARGS ?=

.PHONY: run test setup setup-test clean bench

$(VENV)/.created:
	@py="$$(scripts/find-python.sh)" && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	@scripts/install-openblas.sh
	$(PY) -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	@scripts/install-chromium.sh
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

## run: a local node serving the built-in synthetic demo model (OpenAI API on $(HOST):$(PORT))
run: setup
	$(VENV)/bin/exo-lab up --host $(HOST) --port $(PORT)

## test: set up everything and run the whole test suite
test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/single_node.py

clean:
	rm -rf $(VENV) .pytest_cache
