"""Settings of Celery worker processes started by the tests: the test project's settings,
sharing the test process's progress-store key prefix, with task_ferry's INFO log lines."""

import copy
import os

from tests.settings import *  # noqa: F403
from tests.settings import LOGGING, TASK_FERRY

TASK_FERRY = {**TASK_FERRY, "KEY_PREFIX": os.environ["TASK_FERRY_TEST_KEY_PREFIX"]}
# A worker whose project dispatches with the CeleryExecutor, to this queue (the executor's
# start-up hint about the worker's queues needs it).
if os.environ.get("TASK_FERRY_TEST_CELERY_QUEUE"):
    TASK_FERRY = {
        **TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": os.environ["TASK_FERRY_TEST_CELERY_QUEUE"],
    }
# Celery's own log handler prints task_ferry's lines once, with the process name.
LOGGING = copy.deepcopy(LOGGING)
LOGGING["loggers"]["task_ferry"] = {"level": "INFO"}
# The throughput benchmark runs with persistent connections, as production workers should.
if os.environ.get("TASK_FERRY_TEST_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["TASK_FERRY_TEST_CONN_MAX_AGE"])  # noqa: F405
# The benchmark's --synchronous-commit=off: commits stop waiting for the WAL flush.
if os.environ.get("TASK_FERRY_TEST_SYNCHRONOUS_COMMIT"):
    DATABASES["default"]["OPTIONS"] = {  # noqa: F405
        **DATABASES["default"].get("OPTIONS", {}),  # noqa: F405
        "options": f"-c synchronous_commit={os.environ['TASK_FERRY_TEST_SYNCHRONOUS_COMMIT']}",
    }
