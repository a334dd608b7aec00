# carbon-router: every target creates .venv and installs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Tests, benchmarks and the local demo read the shared real data when it is there;
# elsewhere the project downloads the pinned public files into the user cache.
SHARED := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED)/carbon),)
export CARBON_ROUTER_DATA ?= $(SHARED)
endif

.PHONY: serve test lint typecheck check bench clean

$(BIN)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,local]'
	touch $@

serve: $(BIN)/.installed-dev
	$(BIN)/router serve --config configs/local.yaml

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check .

typecheck: $(BIN)/.installed-dev
	$(BIN)/mypy

check: lint typecheck test

bench: $(BIN)/.installed-dev
	$(BIN)/python benchmarks/forecast.py
	$(BIN)/python benchmarks/ledger.py
	$(BIN)/python benchmarks/attribution_local.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
