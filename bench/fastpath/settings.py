"""Settings of the fast-path benchmarks: the test project, plus the benchmark job types.

The benchmarks set TASK_FERRY_BENCH_REDIS_URL to a redis-server of their own, so Redis command
counts are exact, and TASK_FERRY_BENCH_EXECUTOR to the executor whose worker they start (a
Celery worker uses that Redis as its broker too, through TASK_FERRY_TEST_BROKER_URL).
"""

import os

from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS, TASK_FERRY

INSTALLED_APPS = [*INSTALLED_APPS, "bench.fastpath"]
DEBUG = False
TASK_FERRY = {
    **TASK_FERRY,
    "REDIS_URL": os.environ.get("TASK_FERRY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"),
    "KEY_PREFIX": "tf-bench",
    "EXECUTOR": os.environ.get(
        "TASK_FERRY_BENCH_EXECUTOR", "task_ferry.executors.immediate.ImmediateExecutor"
    ),
    "CELERY_QUEUE": "fastpath-bench",
    "TASKS_BACKEND": "fastpath-bench",
}
TASKS = {"fastpath-bench": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []}}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"task_ferry": {"handlers": ["console"], "level": "ERROR"}},
}
