# The two set-up commands of the README: `make repro` (pipeline) and `make test-all` (every test, what CI runs; `make test` is the quicker tier).
# Each creates .venv and installs the project first when needed.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test test-all lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e ".[dev]"
	touch $@

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# `make test`: every test but the scenario tests (pyproject.toml's markers), with an
# end-to-end `dvc repro` of the tiny settings. `make test-all`: the scenario tests as well,
# the default pipeline's `dvc repro` among them; CI runs it (docs/benchmarks.md, "The test
# suite", has the timings).
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" pytest -m "not scenario"

test-all: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts && $(BIN)/ruff format --check src tests scripts
