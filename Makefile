# Two commands on a fresh machine:
#   make demo   set up, then run the demo sweep (local executor, embedded MLflow, synthetic data, tiny LLM)
#   make test   set up, then run the whole test suite (starts the dev Slurm cluster and an MLflow server)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is a CPU build that lies on this kind of machine's disk; a GPU user installs
# their CUDA torch first and `make setup` leaves it alone.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-shuffled test-learning test-fast lint bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

DEMO := runs/demo
demo: setup
	test -d $(DEMO)/data/casme2 || $(BIN)/aullm-grid data synth --layout casme2 --out $(DEMO)/data/casme2 --subjects 4
	test -d $(DEMO)/data/samm || $(BIN)/aullm-grid data synth --layout samm --out $(DEMO)/data/samm --subjects 4
	$(BIN)/aullm-grid model tiny --out $(DEMO)/models/tiny-qwen2
	$(BIN)/aullm-grid submit sweeps/demo.yaml --wait
	$(BIN)/aullm-grid collect sweeps/demo.yaml

lint: setup
	$(BIN)/lint-imports

# The import contracts (.importlinter) first: a broken layer fails `make test` in a second,
# before the cluster starts.
test: setup
	$(BIN)/lint-imports
	bash slurm/dev/install.sh
	$(BIN)/python -m pytest -q

# The same suite in another order (tests/order.py): modules whole, shuffled, and their tests
# shuffled among themselves. SEED=N repeats an order; the default draws a new one.
SEED ?= $(shell date +%s)
test-shuffled: setup
	bash slurm/dev/install.sh
	$(BIN)/python -m pytest -q --shuffle $(SEED)

test-learning: setup
	$(BIN)/python -m pytest -q -s -m learning

test-fast: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-demo:
	rm -rf runs/demo
