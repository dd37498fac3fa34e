# wallet-migration developer entry points. `make demo` and `make test` are all you need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint down status install

# Install (or refresh) the project into .venv whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Start the embedded stack (idempotent), then run the live migration demo against it.
demo: $(STAMP)
	$(BIN)/walletmig dev up
	$(BIN)/walletmig demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict
	$(BIN)/lint-imports

status: $(STAMP)
	$(BIN)/walletmig dev status

down: $(STAMP)
	$(BIN)/walletmig dev down
