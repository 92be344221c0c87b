# One task runner for people and CI. The README's two commands are `make example` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: example test lint typecheck migrations-check docs test-postgres test-pgbouncer test-sqlite test-mysql \
	test-example test-compat clean test-matrix test-dj60 test-dj61 test-core bench-fastpath bench-throughput \
	bench-api

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Runs the example project on SQLite with no Redis or broker: http://127.0.0.1:8000/
example: $(STAMP)
	$(BIN)/python example/manage.py runexample

test: lint typecheck migrations-check docs test-postgres test-pgbouncer test-sqlite test-mysql \
	test-compat test-example test-matrix

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

# The same behind a PgBouncer of its own in transaction mode (Debian's pgbouncer), as many
# deployments run; the browser test is left out (it checks the page, not the connection).
test-pgbouncer: $(STAMP)
	TASK_FERRY_TEST_STORE=redis $(BIN)/python -m tests.pgbouncer --ignore=tests/browser

# SQLite and Django's cache as the progress store; tests that need a worker are skipped.
test-sqlite: $(STAMP)
	TASK_FERRY_TEST_DB=sqlite TASK_FERRY_TEST_STORE=cache $(BIN)/python -m pytest -m "not worker"

# MariaDB (or MySQL) on 127.0.0.1:3306 as root without a password, and Redis; real worker
# processes included. mysqlclient compiles against default-libmysqlclient-dev (.ci/run installs it).
$(VENV)/.mysql: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test-mysql]'
	touch $@

test-mysql: $(VENV)/.mysql
	TASK_FERRY_TEST_DB=mysql TASK_FERRY_TEST_STORE=redis $(BIN)/python -m pytest

# The matrix: each session gets its own venv, built from pyproject.toml alone.
# Django 6.x runs on built-in django.tasks with django-tasks-db (no backport installed).
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
PYTHON_DJ60 ?= $(PYENV_ROOT)/versions/3.12.1/bin/python
PYTHON_DJ61 ?= $(PYENV_ROOT)/versions/3.13.0/bin/python
OPTIONAL_MODULES := celery django_tasks django_tasks_db drf_spectacular

test-matrix: test-dj60 test-dj61 test-core

.venv-dj60/.installed: pyproject.toml
	rm -rf .venv-dj60 && $(PYTHON_DJ60) -m venv .venv-dj60
	.venv-dj60/bin/python -m pip install -q -e '.[dev]' 'Django>=6.0,<6.1'
	touch $@

.venv-dj61/.installed: pyproject.toml
	rm -rf .venv-dj61 && $(PYTHON_DJ61) -m venv .venv-dj61
	.venv-dj61/bin/python -m pip install -q -e '.[dev]' 'Django>=6.1,<6.2'
	touch $@

# No optional extras: the core must import and pass; tests of an extra skip.
.venv-core/.installed: pyproject.toml
	rm -rf .venv-core && $(PYTHON) -m venv .venv-core
	.venv-core/bin/python -m pip install -q -e '.[test]'
	touch $@

test-dj60: .venv-dj60/.installed
	.venv-dj60/bin/python -c "import django, django.tasks, importlib.util as u; \
		assert u.find_spec('django_tasks') is None, 'the backport must not be needed on Django 6'; \
		print('Django', django.__version__)"
	TASK_FERRY_TEST_DB=postgresql TASK_FERRY_TEST_STORE=redis .venv-dj60/bin/python -m pytest

test-dj61: .venv-dj61/.installed
	.venv-dj61/bin/python -c "import django, django.tasks, importlib.util as u; \
		assert u.find_spec('django_tasks') is None, 'the backport must not be needed on Django 6'; \
		print('Django', django.__version__)"
	# With prepared statements (psycopg's prepare_threshold, as docs/executors.md recommends):
	# the statements of every job go through a cursor that binds on the server.
	TASK_FERRY_TEST_PREPARE_THRESHOLD=0 TASK_FERRY_TEST_DB=postgresql TASK_FERRY_TEST_STORE=redis \
		.venv-dj61/bin/python -m pytest

test-core: .venv-core/.installed
	.venv-core/bin/python -c "from importlib.util import find_spec; \
		found = [m for m in '$(OPTIONAL_MODULES)'.split() if find_spec(m)]; \
		assert not found, f'optional extras installed in .venv-core: {found}'"
	TASK_FERRY_TEST_DB=postgresql TASK_FERRY_TEST_STORE=redis .venv-core/bin/python -m pytest

# Projects configured unlike tests/settings.py (tests/settings_compat.py): USE_TZ = False in a
# time zone far from UTC, then USE_TZ = True there; a user model with a UUID key not named id.
test-compat: $(STAMP)
	TASK_FERRY_TEST_DB=sqlite $(BIN)/python -m django makemigrations --check --dry-run \
		--settings=tests.settings_compat
	TASK_FERRY_TEST_DB=postgresql TASK_FERRY_TEST_STORE=redis \
		$(BIN)/python -m pytest --ds tests.settings_compat tests/compat
	TASK_FERRY_TEST_DB=postgresql TASK_FERRY_TEST_STORE=redis TASK_FERRY_TEST_USE_TZ=1 \
		$(BIN)/python -m pytest --ds tests.settings_compat tests/compat
	TASK_FERRY_TEST_DB=sqlite TASK_FERRY_TEST_STORE=cache \
		$(BIN)/python -m pytest --ds tests.settings_compat tests/compat

# The example project's own tests (its job type, page and download), on in-memory SQLite.
test-example: $(STAMP)
	$(BIN)/python example/manage.py makemigrations --check --dry-run exports
	$(BIN)/python example/manage.py test exports

# Fast-path targets of docs/progress.md: tick cost, freshness, cancel latency, cancel under locks.
# Needs PostgreSQL on 127.0.0.1 and redis-server on PATH; starts its own Redis and worker.
bench-fastpath: $(STAMP)
	$(BIN)/python -m bench.ticks
	$(BIN)/python -m bench.freshness
	$(BIN)/python -m bench.cancel_latency
	$(BIN)/python -m bench.cancel_under_locks

# Job layer vs bare Celery (docs/benchmarks.md). Needs PostgreSQL on 127.0.0.1 and redis-server
# on PATH; starts its own Redis and a 2-process Celery worker.
bench-throughput: $(STAMP)
	$(BIN)/python -m bench.throughput

clean:
	rm -rf $(VENV) .venv-dj60 .venv-dj61 .venv-core .pytest_cache .mypy_cache .ruff_cache

# API poll cost vs a bare DRF view, and SSE fan-out on one uvicorn process (docs/api.md).
# Needs PostgreSQL and Redis on 127.0.0.1.
bench-api: $(STAMP)
	$(BIN)/python -m bench.api_poll
	$(BIN)/python -m bench.api_sse
