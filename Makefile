# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   creates .venv if missing, installs, runs the offline demo
#   make test   creates .venv if missing, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.personalize-installed
# The CPU build of torch for machines without CUDA (never the multi-GB CUDA build there).
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing the default (CUDA) torch build"; \
		$(BIN)/python -m pip install -q torch; \
	else \
		echo "no CUDA: installing the CPU torch build $(TORCH_CPU_VERSION)"; \
		$(BIN)/python -m pip install -q --no-deps --no-index "torch==$(TORCH_CPU_VERSION)" 2>/dev/null \
		|| $(BIN)/python -m pip install -q "torch==$(TORCH_CPU_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -q -e ".[test,dev,quant]"
	@touch $(STAMP)

demo: $(STAMP)
	@# One OpenMP thread: the tiny model gains nothing from more, and on a busy 2-core machine
	@# threads that spin-wait on each other make each step ~30x slower.
	OMP_NUM_THREADS=1 $(BIN)/personalize train --images examples/cat --preset tiny --output demo-out/cat
	@echo "demo: adapter, samples/, config.yaml and README.md written to demo-out/cat/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-out build dist *.egg-info
