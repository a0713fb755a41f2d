# Two commands for a new user: `make demo` and `make test` (both create .venv when missing).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint test-all gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,datasets]"  # the datasets extra too, so its loaders are tested
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lightyard demo

test: lint  ## lint, then the suite (CPU, under 10 minutes on 2 cores)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

test-all: $(STAMP)  ## slow tests too (still CPU)
	$(BIN)/python -m pytest -m "not gpu"

gpu-check: $(STAMP)  ## on a CUDA machine: GPU tests + every bench, results into gpu-results/
	bash tests/gpu/run_all.sh gpu-results

clean:  ## the project's own leftovers; runs, stores and caches live in $$LIGHTYARD_HOME (default ~/.lightyard)
	rm -rf .pytest_cache build *.egg-info
