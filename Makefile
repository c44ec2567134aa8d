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

# Measurements, not tests: the keeper and the simulator as separate processes on loopback.
bench: $(STAMP)
	$(BIN)/python bench/idle_sessions.py --accounts 500 --seconds 30
	$(BIN)/python bench/gateway_roundtrip.py --requests 5000 --seconds 5
