# The verbs the README and CI use. Everything installs into .venv from PyPI; no Docker, no root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest -p nudge.testing.fixtures

.PHONY: all install protos check-protos breaking lint format test test-unit test-integration test-e2e demo bench up clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	bash scripts/gen_protos.sh $(CURDIR)/libs

check-protos: $(STAMP)
	bash scripts/check_protos.sh

lint: $(STAMP) check-protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs services tests scripts
	cd protos && ../$(BIN)/buf lint
	$(MAKE) --no-print-directory breaking
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

# Protos stay compatible within a vN package (docs/operations.md): protos/ as it is now against
# the same directory on `main` (BREAKING_AGAINST=<git ref>, e.g. HEAD~1, for another baseline).
# Skipped, with a note, where that ref does not exist (a CI checkout without the branch).
BREAKING_AGAINST ?= main

breaking: $(STAMP)
	@if git rev-parse --verify -q '$(BREAKING_AGAINST)^{commit}' >/dev/null; then \
		cd protos && ../$(BIN)/buf breaking --against '../.git#ref=$(BREAKING_AGAINST),subdir=protos' \
		&& echo "buf breaking: protos/ compatible with $(BREAKING_AGAINST)"; \
	else echo "buf breaking: skipped (no git ref '$(BREAKING_AGAINST)' here)"; fi

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-unit: $(STAMP)
	$(PYTEST) tests/unit -q

test-integration: $(STAMP)
	$(PYTEST) tests/integration -q

test-e2e: $(STAMP)
	$(PYTEST) tests/e2e -q

test: lint
	$(PYTEST) tests -q

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

bench: $(STAMP)
	$(BIN)/python -m scripts.bench

up: $(STAMP)
	$(BIN)/nudge up

clean:
	rm -rf $(VENV) .nudge .mypy_cache .ruff_cache .pytest_cache
