# fairseq-moe: set-up, tests and the main job. Every target that needs Python depends on
# `install`, which is idempotent: it rebuilds .venv only when a requirements file or setup.py
# changed since the last successful install. setup.py declares the plugin's dependencies and its
# console commands (fairseq-moe-usage, ...); requirements/fairseq-runtime.txt those of fairseq.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
FAIRSEQ_DIST ?= fairseq-fixed==0.12.3.1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo compare lint format docs clean-venv

install: $(STAMP)

$(STAMP): setup.py requirements/fairseq-runtime.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@# torch: keep whatever torch the environment already has (a GPU build, say); else the CPU 2.13.0.
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "install: keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PIP) install "torch==$(TORCH_VERSION)"; fi
	@# Pin the torch we have, so that no later step can replace it.
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install -c $(VENV)/torch-constraint.txt -r requirements/fairseq-runtime.txt
	@if $(PY) -c "import fairseq" 2>/dev/null; then echo "install: fairseq already importable"; \
	else echo "install: building $(FAIRSEQ_DIST) (about 5 minutes the first time)"; \
	    $(PIP) install --no-deps --no-build-isolation "$(FAIRSEQ_DIST)"; fi
	@# The plugin with its dependencies (setup.py) and the dev and examples extras; the constraint
	@# keeps the torch above (none of them pulls torch).
	$(PIP) install -c $(VENV)/torch-constraint.txt --no-build-isolation -e ".[dev,examples,serve]"
	@$(PY) -c "import torch, fairseq, fairseq_moe_plugin; print('install: ok, torch', torch.__version__, 'fairseq', fairseq.__version__)"
	@touch $(STAMP)

# The README's test command. Slow tests (the end-to-end run) are included.
test: install
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -ra -m "not slow and not distributed" $(PYTEST_ARGS) tests

# The main job: gettext corpus -> sentencepiece -> train an MoE model (bounded wall clock) ->
# beam search -> BLEU/chrF per language -> results/demo/metrics.json. DEMO_ARGS adds run.py flags,
# e.g. DEMO_ARGS="--budget-minutes 5 --langs de,fr".
DEMO_ARGS ?=
demo: install
	$(PY) examples/translation/run.py --run demo $(DEMO_ARGS)

# MoE vs dense (same data, same training wall clock); COMPARE_ARGS adds flags.
COMPARE_ARGS ?=
compare: install
	$(PY) examples/translation/compare_dense_moe.py $(COMPARE_ARGS)

# The documentation site (mkdocs.yml, pages in docs/) into site/; --strict fails on any warning
# (a broken link or anchor, a page missing from the nav). tests/test_docs.py builds it too.
docs: install
	$(VENV)/bin/mkdocs build --strict -d site

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
