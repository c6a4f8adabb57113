# Solstice, from a clone: `make quickstart` runs the quickstart, `make test` runs the tests.
# Each first makes the virtual environment `.venv` here if it is missing, or if
# pyproject.toml is newer than its stamp (then it installs into the existing `.venv` again).
# To use another environment, follow the manual commands in the README instead.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.solstice-installed
# torch first, pinned to a CPU build: an unpinned `torch` pulls several GB of CUDA wheels.
TORCH := torch==2.13.0
# pytest arguments: 2 worker processes (each test file in one, so its shared runs are made
# once), and extra ones, e.g. `make test PYTEST_ARGS="tests/test_trainer.py -x"`
PYTEST_WORKERS ?= -n 2 --dist loadfile
PYTEST_ARGS ?=

.PHONY: quickstart test lint typecheck docs env

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@
