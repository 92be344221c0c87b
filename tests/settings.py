"""Settings of the test project. Pick the database and progress store with environment
variables: TASK_FERRY_TEST_DB=postgresql|sqlite|mysql (default postgresql) and
TASK_FERRY_TEST_STORE=redis|cache (default redis); TASK_FERRY_TEST_PREPARE_THRESHOLD=N turns on
psycopg's prepared statements on PostgreSQL."""

import os
import uuid
from importlib.util import find_spec
from typing import Any

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "task_ferry",
    "tests.myapp.apps.MyAppConfig",
    "tests.testapp",
]
# The optional extras, when installed (a test session runs without them).
HAS_DJANGO_TASKS_DB = find_spec("django_tasks_db") is not None
if find_spec("django_tasks") is not None:
    INSTALLED_APPS.append("django_tasks")
if HAS_DJANGO_TASKS_DB:
    INSTALLED_APPS.append("django_tasks_db")
if find_spec("drf_spectacular") is not None:
    INSTALLED_APPS.append("drf_spectacular")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DB_VENDOR = os.environ.get("TASK_FERRY_TEST_DB", "postgresql")
DATABASES: dict[str, dict[str, Any]]
if DB_VENDOR == "postgresql":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("TASK_FERRY_TEST_DB_NAME", "task_ferry"),
            "USER": "postgres",
            # The server trusts local connections; the commands' outage tests set one to check
            # that no message shows it.
            "PASSWORD": os.environ.get("TASK_FERRY_TEST_DB_PASSWORD", ""),
            "HOST": "127.0.0.1",
            "PORT": os.environ.get("TASK_FERRY_TEST_DB_PORT", "5432"),
            "TEST": {"NAME": os.environ.get("TASK_FERRY_TEST_DB_TEST_NAME", "test_task_ferry")},
        }
    }
    # Prepared statements, as a project allows them (statements.statement_cursor): "0" prepares
    # every statement of ours the first time it runs.
    if os.environ.get("TASK_FERRY_TEST_PREPARE_THRESHOLD"):
        DATABASES["default"]["OPTIONS"] = {
            "prepare_threshold": int(os.environ["TASK_FERRY_TEST_PREPARE_THRESHOLD"])
        }
elif DB_VENDOR == "mysql":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "NAME": os.environ.get("TASK_FERRY_TEST_DB_NAME", "task_ferry"),
            "USER": "root",
            "PASSWORD": os.environ.get("TASK_FERRY_TEST_DB_PASSWORD", ""),
            "HOST": "127.0.0.1",
            "PORT": os.environ.get("TASK_FERRY_TEST_DB_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {
                "NAME": os.environ.get("TASK_FERRY_TEST_DB_TEST_NAME", "test_task_ferry"),
                "CHARSET": "utf8mb4",
                "COLLATION": "utf8mb4_unicode_ci",
            },
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("TASK_FERRY_TEST_SQLITE", "test-task-ferry.sqlite3"),
            "TEST": {"NAME": os.environ.get("TASK_FERRY_TEST_SQLITE", None)},
        }
    }

# The commands' outage tests give up on a server that takes no connections.
if os.environ.get("TASK_FERRY_TEST_DB_CONNECT_TIMEOUT") and DB_VENDOR != "sqlite":
    DATABASES["default"]["OPTIONS"] = {
        **DATABASES["default"].get("OPTIONS", {}),
        "connect_timeout": int(os.environ["TASK_FERRY_TEST_DB_CONNECT_TIMEOUT"]),
    }

# A second alias for the same database, for tests whose router writes jobs elsewhere than
# "default" (a connection of its own, so its transactions are its own).
DATABASES["jobs"] = {**DATABASES["default"], "TEST": {"MIRROR": "default"}}
# A database of its own, with the schema and none of the rows: a read replica that has not
# caught up yet, for the tests of routers that read from one.
_default_test = DATABASES["default"]["TEST"]
DATABASES["replica"] = {
    **DATABASES["default"],
    "TEST": {
        **_default_test,
        # SQLite in memory (no name) gets one database per alias anyway.
        "NAME": f"{_default_test['NAME']}_replica" if _default_test["NAME"] else None,
    },
}

REDIS_URL = os.environ.get("TASK_FERRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
STORE = os.environ.get("TASK_FERRY_TEST_STORE", "redis")

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# One id per test run, inherited by the worker processes the tests start through os.environ.
RUN_ID = os.environ.setdefault("TASK_FERRY_TEST_RUN_ID", uuid.uuid4().hex[:8])

TASK_FERRY: dict[str, Any] = {
    "EXECUTOR": "task_ferry.executors.immediate.ImmediateExecutor",
    "REDIS_URL": REDIS_URL if STORE == "redis" else None,
    # Each test run gets its own keys, so snapshots of an earlier run never leak in.
    "KEY_PREFIX": f"tf-test-{RUN_ID}",
    # Only DjangoTasksExecutor reads it; its own alias keeps other runs' db_workers away.
    "TASKS_BACKEND": f"tf-test-{RUN_ID}",
}
# A worker process that a test starts with a heartbeat as short as the test's own settings.
if os.environ.get("TASK_FERRY_TEST_HEARTBEAT_INTERVAL"):
    TASK_FERRY["HEARTBEAT_INTERVAL"] = float(os.environ["TASK_FERRY_TEST_HEARTBEAT_INTERVAL"])
# A worker process started with a typo in its settings, as a user might: "REDIS_ULR".
if os.environ.get("TASK_FERRY_TEST_MISSPELT_REDIS_URL"):
    TASK_FERRY["REDIS_ULR"] = TASK_FERRY.pop("REDIS_URL")

if HAS_DJANGO_TASKS_DB:
    # An empty QUEUES allows every queue name.
    TASKS = {
        TASK_FERRY["TASKS_BACKEND"]: {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []}
    }

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
    ],
}

STATIC_URL = "/static/"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"task_ferry": {"handlers": ["console"], "level": "WARNING"}},
}

# Fast hashing keeps user fixtures cheap; never do this outside tests.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
