# exo_lab — `make run` starts the demo; `make test` sets up and runs every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 52415
PYTEST_ARGS ?=

.PHONY: run test setup setup-test clean bench labextension lint typecheck

$(VENV)/.created:
	@py="$$(scripts/find-python.sh)" && echo "creating $(VENV) with $$py" && $$py -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	@scripts/install-openblas.sh
	@$(PY) -m pip install -q 'hatchling>=1.25' editables 'hatch-jupyter-builder>=0.9'  # pyproject's build-system
	@rm -f exo_lab/labextension/install.json  # a built extension's copy would be added to the wheel twice
	SKIP_JUPYTER_BUILDER=1 $(PY) -m pip install -q --no-build-isolation -e .
	@$(PY) -m exo_lab.native  # the decode kernels for this CPU: fp32 small GEMM, 16-bit weights (else built on first use)
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	@scripts/install-chromium.sh
	@rm -f exo_lab/labextension/install.json
	SKIP_JUPYTER_BUILDER=1 $(PY) -m pip install -q --no-build-isolation -e '.[test]'
	@touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

## labextension: build the JupyterLab side panel (extensions/jupyterlab -> exo_lab/labextension) and
## link it into the venv, like `jupyter labextension develop`; skipped when the build is newer than its sources
## (its own and the graph renderer it bundles from exo_lab/ui/static). Installs above skip the build hook
## (SKIP_JUPYTER_BUILDER=1) that builds the same thing for a wheel (pyproject.toml, hatch-jupyter-builder),
## and build in the venv (no isolated env with JupyterLab for jlpm, which only the hook needs).
LABEXT_SRC := extensions/jupyterlab
LABEXT_OUT := exo_lab/labextension
LABEXT_LINK := $(VENV)/share/jupyter/labextensions/exo-lab
LABEXT_INPUTS := $(wildcard $(LABEXT_SRC)/src/*.ts $(LABEXT_SRC)/style/*) $(addprefix $(LABEXT_SRC)/,package.json tsconfig.json yarn.lock .yarnrc.yml) \
	exo_lab/ui/static/topology.js exo_lab/ui/static/topology.css
JLPM := PATH="$(abspath $(VENV))/bin:$$PATH" jlpm

$(LABEXT_SRC)/node_modules/.installed: $(addprefix $(LABEXT_SRC)/,package.json yarn.lock .yarnrc.yml) | $(VENV)/.installed-test
	cd $(LABEXT_SRC) && $(JLPM) install --immutable
	@touch $@

# after a reinstall too: pip may have replaced the linked build with the copy an editable wheel carries
$(LABEXT_OUT)/package.json: $(LABEXT_INPUTS) $(LABEXT_SRC)/node_modules/.installed $(VENV)/.installed-test
	cd $(LABEXT_SRC) && $(JLPM) clean && $(JLPM) build
	@touch $@

labextension: $(LABEXT_OUT)/package.json
	@mkdir -p $(dir $(LABEXT_LINK))
	@if [ "$$(readlink $(LABEXT_LINK))" != "$(abspath $(LABEXT_OUT))" ]; then \
		rm -rf $(LABEXT_LINK) && ln -s $(abspath $(LABEXT_OUT)) $(LABEXT_LINK) && echo "linked $(LABEXT_LINK)"; fi

## run: `exo-lab up`: this machine as a cluster member (node agent, API on $(HOST):$(PORT), dashboard), serving the demo model when alone
run: setup
	$(VENV)/bin/exo-lab up --host $(HOST) --port $(PORT)

## lint: ruff (lint rules and formatting, checked, nothing rewritten)
lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## typecheck: pyright (basic) over the package
typecheck: setup-test
	$(VENV)/bin/pyright

## test: set up everything, then lint, type-check and run the whole test suite (layer contract included):
## every test but the simulated hosts' on two pytest workers, a file per worker at a time (a module's
## servers and clusters start once; most of a cluster test is waiting on processes that start and links that
## answer, not the cores); then the simulated hosts (tests/sim), whose shaped links are timed, in one process.
## $(PYTEST_ARGS) goes to both runs (a run it leaves without tests passes). This machine's device profile is
## measured first, on a quiet machine, as a user's node measures it: measured by the first test that needs it,
## beside the other worker's tests, its products read slowly enough to mislead the planner.
## The extension's build (node) and the type check (pyright, ~40 s) take a core each, side by side.
SERIAL_TESTS := tests/sim
test: setup-test
	$(MAKE) --no-print-directory -j2 labextension lint typecheck
	$(PY) -c "from exo_lab.cluster.profile import load_or_measure; load_or_measure()"
	$(PY) -m pytest -n 2 --dist loadfile $(addprefix --ignore=,$(SERIAL_TESTS)) $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest $(SERIAL_TESTS) $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: setup
	$(PY) benchmarks/single_node.py

clean:
	rm -rf $(VENV) .pytest_cache $(LABEXT_OUT) $(addprefix $(LABEXT_SRC)/,node_modules lib tsconfig.tsbuildinfo)
