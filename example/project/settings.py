"""Settings of the example project. For local development only: DEBUG is on, the secret key is
public and a demo user is logged in automatically.

Out of the box it needs no services: SQLite holds the jobs and the task queue, a db_worker
process runs the jobs, and a file-based cache carries live progress between the worker and the
web server. Set REDIS_URL to keep progress in Redis instead.

Environment variables: EXAMPLE_DATA_DIR (where the database, progress cache and export files
go; default: this directory), REDIS_URL, EXAMPLE_KEY_PREFIX (of the keys in Redis),
EXAMPLE_EXPORT_SECONDS (default length of an export).
"""

import os
from importlib.util import find_spec
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("EXAMPLE_DATA_DIR", BASE_DIR))

SECRET_KEY = "example-project-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "task_ferry",
    "exports",
]
# Django 5.2 needs the django-tasks backport; Django 6 ships django.tasks itself.
if find_spec("django_tasks") is not None:
    INSTALLED_APPS.append("django_tasks")
INSTALLED_APPS.append("django_tasks_db")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # DEVELOPMENT ONLY: logs every visitor in as the demo user. Never use this in production.
    "project.demo_login.DemoLoginMiddleware",
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

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "db.sqlite3",
        "OPTIONS": {
            # Two processes write to this file: wait for the other one's lock, don't fail.
            "timeout": 20,
            # WAL lets the web server read while the worker writes.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # Shared by the web server and the worker: live progress and cancel requests.
    "progress": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": DATA_DIR / ".progress-cache",
    },
}

TASK_FERRY = {
    "EXECUTOR": "task_ferry.executors.django_tasks.DjangoTasksExecutor",
    "CACHE_ALIAS": "progress",
    "REDIS_URL": os.environ.get("REDIS_URL") or None,
    "KEY_PREFIX": os.environ.get("EXAMPLE_KEY_PREFIX", "task_ferry_example"),
    "PUBLISH_INTERVAL": 0.1,
}

TASKS = {
    "default": {
        "BACKEND": "django_tasks_db.DatabaseBackend",
        # Every queue a job type uses (task_ferry.E025); ExportJobType sets none, so "default".
        "QUEUES": ["default"],
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}

DEMO_USERNAME = "demo"
EXPORT_DIR = DATA_DIR / "export-files"
EXPORT_DEFAULT_SECONDS = float(os.environ.get("EXAMPLE_EXPORT_SECONDS", "8"))

STATIC_URL = "/static/"
LOGIN_URL = "/admin/login/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "task_ferry": {"handlers": ["console"], "level": "INFO"},
        "django_tasks_db": {"handlers": ["console"], "level": "WARNING"},
    },
}
