# Two commands for a new user: `make demo` and `make test` (both create .venv when missing).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

.PHONY: install demo test lint lock lock-check test-all ui-screenshot gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# the whole dependency tree from the lock (pinned, with hashes; the datasets extra too, so its loaders are
# tested), then the project itself without dependencies
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

lock:  ## re-pin the whole tree from pyproject.toml and its extras (needs the package index; several minutes)
	$(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet pip-tools==7.6.2
	.lock-venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links --extra test --extra datasets -o $(LOCK) pyproject.toml

lock-check: $(STAMP)  ## offline: every requirement of pyproject.toml is in the lock at an admitted version
	$(BIN)/lightyard env --check-lock

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lightyard demo

# the suite in this many pytest-xdist workers (one per core on the 2-core CI machine: 1.55× faster than one process)
TEST_WORKERS ?= 2

test: lint lock-check  ## lint, the lock check, then the suite (CPU, under 10 minutes on 2 cores)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-all: $(STAMP)  ## slow tests too (still CPU)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not gpu"

ui-screenshot: $(STAMP)  ## headless Chromium's view of a smoke grid compared in MLflow: pipelines/$(PIPELINE)/mlflow_comparison.png
	$(BIN)/python tests/ui_screenshot.py $(PIPELINE)

gpu-check: $(STAMP)  ## on a CUDA machine: GPU tests + every bench, results into gpu-results/
	bash tests/gpu/run_all.sh gpu-results

clean:  ## the project's own leftovers; runs, stores and caches live in $$LIGHTYARD_HOME (default ~/.lightyard)
	rm -rf .pytest_cache build *.egg-info
