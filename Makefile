# One task runner for people and CI. The README's two commands are `make example` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: example test lint typecheck migrations-check docs test-postgres test-sqlite clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Runs the example project on SQLite with no Redis or broker: http://127.0.0.1:8000/
example: $(STAMP)
	$(BIN)/python example/manage.py runexample

test: lint typecheck migrations-check docs test-postgres test-sqlite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy task_ferry

migrations-check: $(STAMP)
	TASK_FERRY_TEST_DB=sqlite $(BIN)/python -m django makemigrations --check --dry-run --settings=tests.settings

# The documentation site, in site/; warnings (broken links, pages missing from nav) fail it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# PostgreSQL and Redis on 127.0.0.1, real worker processes included.
test-postgres: $(STAMP)
	TASK_FERRY_TEST_DB=postgresql TASK_FERRY_TEST_STORE=redis $(BIN)/python -m pytest

# SQLite and Django's cache as the progress store; tests that need a worker are skipped.
test-sqlite: $(STAMP)
	TASK_FERRY_TEST_DB=sqlite TASK_FERRY_TEST_STORE=cache $(BIN)/python -m pytest -m "not worker"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
