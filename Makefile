# The verbs the README and CI use. Everything installs into .venv from PyPI; no Docker, no root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest -p nudge.testing.fixtures

.PHONY: all install protos check-protos lint format test test-unit test-integration test-e2e demo bench up clean

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
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

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
