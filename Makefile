# Everything runs from a local virtualenv that `make` builds on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint demo bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/deribit-keeper demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Measurements, not tests: every figure of the performance issue, keeper beside the floor, into
# bench/RESULTS.md (about 25 minutes; `$(BIN)/python bench/run.py --quick` takes about 3).
# py-spy is only for the profile section, so it is installed here rather than in every venv.
bench: $(STAMP)
	test -x $(BIN)/py-spy || $(BIN)/pip install --quiet 'py-spy>=0.3.14'
	$(BIN)/python bench/run.py
