# atrc_exp — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_ARGS ?=

# Tests never talk to a W&B server.
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install train test test-full lint format clean bench bench-data bench-ops

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install atrc_exp with its dev tools

train: $(STAMP) ## the ATRC pipeline on synthetic data: search, distillation, MT baseline (about 7 min on 2 cores)
	$(BIN)/atrc-train mode=pipeline $(TRAIN_ARGS)

test: $(STAMP) ## the test suite without slow tests (the CI gate)
	WANDB_DIR=$$(mktemp -d) $(BIN)/python -m pytest -m "not slow and not cuda" $(PYTEST_ARGS)

test-full: $(STAMP) ## every test, slow and CUDA ones included (CUDA skips without a GPU)
	WANDB_DIR=$$(mktemp -d) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## training step per context (none, atrc, search) and fast path: ms/step, × none, peak memory, ATen ops/step (JSON in benchmarks/)
	$(BIN)/python benchmarks/bench_train.py $(BENCH_ARGS)

bench-data: $(STAMP) ## train-transform samples/s on NYUD- and PASCAL-sized inputs (vs the reference pipeline and the original's 57/s)
	$(BIN)/python benchmarks/bench_data.py

bench-ops: $(STAMP) ## local-attention backends: time, memory, FLOP floor (JSON in benchmarks/)
	$(BIN)/python benchmarks/bench_local_attention.py --threads 2 --out benchmarks/results-ops-$$(hostname).json

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check atrc_exp tests benchmarks
	$(BIN)/ruff format --check atrc_exp tests benchmarks

format: $(STAMP) ## ruff fix + format
	$(BIN)/ruff check --fix atrc_exp tests benchmarks
	$(BIN)/ruff format atrc_exp tests benchmarks

clean: ## remove caches and local outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
