# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   creates .venv if missing, installs, runs the offline demo
#   make test   creates .venv if missing, installs, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.personalize-installed
# Every install uses the versions CI tested (constraints.txt); README says how to move them.
CONSTRAINTS ?= constraints.txt
# The torch version of constraints.txt; on a machine without CUDA its CPU build (never the multi-GB CUDA build).
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(CONSTRAINTS))
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup browser demo test test-all lint clean constraints

setup: $(STAMP) browser

# The web UI's browser tests (tests/ui) drive Debian's chromium through Playwright (never a downloaded
# browser): installed here when missing, where apt-get runs as root; elsewhere those tests skip, saying why.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the browser tests will be skipped"; \
	fi

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing the CUDA torch build $(TORCH_VERSION)"; \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "no CUDA: installing the CPU torch build $(TORCH_VERSION)"; \
		$(BIN)/python -m pip install -q --no-deps --no-index "torch==$(TORCH_VERSION)" 2>/dev/null \
		|| $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test,dev,quant]"
	@touch $(STAMP)

# After testing newer dependencies in .venv (README: "Moving to newer dependencies"): record them.
constraints:
	@{ grep '^#' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new
	@mv $(CONSTRAINTS).new $(CONSTRAINTS) && echo "wrote $(CONSTRAINTS)"

# The demo personalizes the pretrained world model (benchmarks/dreambench_mini/model, shipped) on five photos
# of a ball it never saw (examples/ball), then draws the same prompts before and after (README: "The demo").
# No method flag: the base's own training_defaults.json decides (benchmarks/results/dreambench_mini.md).
demo: $(STAMP)
	$(BIN)/personalize train --images examples/ball --model dreambench-mini --token sks --class-word ball \
		--set validation_images=0 --output demo-out/ball --overwrite
	$(BIN)/python -m benchmarks.dreambench_mini.demo demo-out/ball
	@echo "demo: adapter, before_after.png, loss.png, config.yaml and README.md written to demo-out/ball/"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-out build dist *.egg-info
