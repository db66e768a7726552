# The two set-up commands of the README: `make repro` (pipeline) and `make test` (tests).
# Each creates .venv and installs the project first when needed.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e ".[dev]"
	touch $@

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts && $(BIN)/ruff format --check src tests scripts
