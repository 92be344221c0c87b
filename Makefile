# One task runner for people and CI. The README's two commands are `make example` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: example test lint typecheck migrations-check test-postgres test-sqlite clean bench-fastpath

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Runs the example project on SQLite with no Redis or broker: http://127.0.0.1:8000/
example: $(STAMP)
	$(BIN)/python example/manage.py runexample

test: lint typecheck migrations-check test-postgres test-sqlite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy task_ferry

migrations-check: $(STAMP)
	TASK_FERRY_TEST_DB=sqlite $(BIN)/python -m django makemigrations --check --dry-run --settings=tests.settings

# PostgreSQL and Redis on 127.0.0.1, real worker processes included.
test-postgres: $(STAMP)
	TASK_FERRY_TEST_DB=postgresql TASK_FERRY_TEST_STORE=redis $(BIN)/python -m pytest

# SQLite and Django's cache as the progress store; tests that need a worker are skipped.
test-sqlite: $(STAMP)
	TASK_FERRY_TEST_DB=sqlite TASK_FERRY_TEST_STORE=cache $(BIN)/python -m pytest -m "not worker"

# Fast-path targets of docs/progress.md: tick cost, freshness, cancel latency, cancel under locks.
# Needs PostgreSQL on 127.0.0.1 and redis-server on PATH; starts its own Redis and worker.
bench-fastpath: $(STAMP)
	$(BIN)/python -m bench.ticks
	$(BIN)/python -m bench.freshness
	$(BIN)/python -m bench.cancel_latency
	$(BIN)/python -m bench.cancel_under_locks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
