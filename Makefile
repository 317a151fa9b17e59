# `make run` trains the default model end to end; `make test` runs the test suite.
# `make lint` runs ruff and mypy as configured in pyproject.toml (also .pre-commit-config.yaml).
# All create .venv on first use (CPU torch wheel, then this project in editable mode).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint parity bench venv clean

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

clean:
	rm -rf $(VENV)
