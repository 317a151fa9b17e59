# `make run` trains the default model end to end; `make test` runs the test suite.
# `make lint` runs ruff and mypy as configured in pyproject.toml (also .pre-commit-config.yaml).
# All create .venv on first use (CPU torch wheel, then this project in editable mode).
# `make gpu-env` rehearses the GPU machine's software on this CPU (not part of `make test`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The GPU machine's software: Python 3.12, torch 2.11.0 (PyPI's CUDA build, ~3 GB with its
# nvidia wheels; it imports on a CPU), triton 3.6.0, numpy 2.5, transformers 5.17, no wandb.
# The project runs from the source tree (PYTHONPATH), as on the GPU machine.
GPU_PY ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
GPU_PKGS := "torch==2.11.0" "triton==3.6.0" "numpy>=2.5,<2.6" "transformers>=5.17,<5.18" "numba>=0.60" \
	"regex>=2023.0" "tqdm>=4.66" "matplotlib>=3.8" "safetensors>=0.4" "pytest>=8" "pytest-benchmark>=4"
GPU_RUN := PYTHONPATH=$(CURDIR) $(GPU_VENV)/bin/python

.PHONY: run test lint parity bench venv clean gpu-env gpu-report

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m cs336.train $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check cs336 kernels bench tests
	$(BIN)/python -m mypy

parity: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests/parity $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-json bench-out.json $(ARGS)

$(GPU_STAMP):
	test -x $(GPU_VENV)/bin/python || $(GPU_PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q $(GPU_PKGS)
	touch $(GPU_STAMP)

# The compile gate, the parity suite (interpreter) and the report's dry run, on those versions.
gpu-env: $(GPU_STAMP)
	$(GPU_RUN) bench/gpu_shapes.py --out $(GPU_VENV)/shapes.json --presets gpt2-small
	$(GPU_RUN) -m kernels.gpu_check --param-shapes $(GPU_VENV)/shapes.json
	TRITON_INTERPRET=1 $(GPU_RUN) -m pytest -q -p no:cacheprovider tests/parity
	$(GPU_RUN) bench/gpu_report.py --dry-run --out-dir $(GPU_VENV)/gpu-report

# On the GPU machine (from the source tree): the report into gpu-report/ and bench/RESULTS.md.
gpu-report:
	PYTHONPATH=$(CURDIR) python bench/gpu_report.py --out-dir gpu-report --out bench/RESULTS.md $(ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV)
