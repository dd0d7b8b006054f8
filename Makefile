# `make test` and `make demo` work on a fresh machine: they build .venv with the CPU build of torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-vision test-matrix soak lint demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build first: a bare torch requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# The tests marked torchvision, against the real torchvision, in a venv of their own (.venv-vision:
# torch 2.14.1 and torchvision 0.29.1, CUDA builds that run on a CPU, about 5.5 GB); never in .venv.
test-vision:
	PYTHON=$(PYTHON) scripts/test_vision.sh

# The suite under both CPU kernel sets (default, avx2) and 1 and 2 threads: what another machine runs.
test-matrix: $(STAMP)
	PYTHON=$(BIN)/python scripts/test_matrix.sh

# tests/distributed 30 times in a row: counts failed runs and aborts at gloo teardown.
soak: $(STAMP)
	PYTHON=$(BIN)/python scripts/soak_distributed.sh 30

demo: $(STAMP)
	$(BIN)/torchsage demo

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) .venv-vision build src/*.egg-info
