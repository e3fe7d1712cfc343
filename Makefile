# ConvLens: `make serve` runs everything on this machine, `make test` runs the checks.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := models service worker jobqueue convlens

.PHONY: install test test-fast lint typecheck pytest serve worker bench data docker-base-images docker-e2e clean

# Create .venv and install the project with its dev tools (pip takes torch's wheels from this disk).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(CODE) tests bench
	$(BIN)/ruff format --check $(CODE) tests bench

typecheck: $(STAMP)
	$(BIN)/mypy $(CODE)

# The whole suite in two test processes (pytest-xdist; a test file stays in one process, so its module fixtures are
# built once), then the ten slowest tests. Many tests wait on servers and workers they start, so two processes
# finish in about two thirds of the time even on two cores. PYTEST_WORKERS=0 runs it in this process alone.
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=10 $(PYTEST_ARGS)

# The README's test command (and CI's): lint, types, then the whole test suite.
test: lint typecheck pytest

# The inner loop: lint, types and every test not marked slow (no browser, docker or multi-process tests).
test-fast: lint typecheck
	$(BIN)/pytest -q -m "not slow" --durations=10 $(PYTEST_ARGS)

serve: $(STAMP)
	$(BIN)/convlens serve

worker: $(STAMP)
	$(BIN)/convlens worker

# Real CIFAR-10 into var/data (for training and benchmarks; the tests make their own synthetic data).
data: $(STAMP)
	$(BIN)/convlens data cifar10 --dest var/data

# Containers (needs a running Docker engine): stand-in base images when no registry answers, then the e2e proof.
docker-base-images:
	scripts/local-base-images.sh

docker-e2e:
	scripts/docker-e2e.sh

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
