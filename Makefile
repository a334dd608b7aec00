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

.PHONY: serve test lint typecheck check bench mutation clean

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

# Every benchmark that runs on a CPU-only machine in a few minutes. Left out:
# - benchmarks/nvml_check.py needs an NVIDIA GPU (it exits 2 without one);
# - benchmarks/overhead.py (with its helper bare_forwarder.py) starts Ray Serve twice and runs
#   12 wrk figures x 3 runs x 8 s plus a 60 s soak: over 6 minutes; run it by hand;
# - benchmarks/faults.py (about 4 minutes) and benchmarks/usage.py (a million-row ledger, twice
#   with --baseline: about 8 minutes) start Ray Serve; run them by hand.
# - benchmarks/dashboard.py builds a million-row ledger through Ledger.write (about 7 minutes
#   here; --ledger PATH keeps it for the next run) and needs chromium; run it by hand.
bench: $(BIN)/.installed-dev
	$(BIN)/python benchmarks/forecast.py
	$(BIN)/python benchmarks/ledger.py
	$(BIN)/python benchmarks/receipts.py
	$(BIN)/python benchmarks/attribution_local.py
	$(BIN)/python benchmarks/simulate.py
	$(BIN)/python benchmarks/http_client.py

# Mutation testing of the modules that decide money and carbon (issue 15); not part of
# `check` or CI. The tool is mutmut 3: it forks a warm pytest per mutant and runs only the
# tests that reach the mutated function (cosmic-ray starts a new pytest per mutant: about 26
# and 40 minutes for preference.py and billing.py alone here). One mutant per CPU at a time;
# each module runs only its own fast tests (the map is in tools/mutation.py; tests marked slow
# are left out). The ledger and receipts (about 1,300 mutants each) take most of the run's
# time. Reviewed equivalent mutants: mutation/equivalents.txt.
# One module: make mutation MODULES=router/preference.py
MODULES ?=
mutation: $(BIN)/.installed-dev
	$(BIN)/python -c 'import mutmut' 2>/dev/null || $(BIN)/pip install -q 'mutmut>=3.3,<4'
	$(BIN)/python tools/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build/mutation
