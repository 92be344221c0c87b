"""Settings of a test server process (uvicorn) started by a test or a benchmark: the test
project's, with jobs left pending (the test runs them) and store keys shared with the test."""

import os

from tests.settings import *  # noqa: F403
from tests.settings import TASK_FERRY

TASK_FERRY = {
    **TASK_FERRY,
    "EXECUTOR": "tests.api.live.HoldExecutor",
    # The test process and the server must share progress-store keys.
    "KEY_PREFIX": os.environ.get("TASK_FERRY_TEST_KEY_PREFIX", TASK_FERRY["KEY_PREFIX"]),
    "SSE_KEEPALIVE": float(os.environ.get("TASK_FERRY_TEST_SSE_KEEPALIVE", "15")),
    # "none" for a benchmark whose streams are all one user's.
    "SSE_MAX_STREAMS_PER_USER": (
        None
        if os.environ.get("TASK_FERRY_TEST_SSE_MAX_STREAMS_PER_USER") == "none"
        else TASK_FERRY.get("SSE_MAX_STREAMS_PER_USER", 20)
    ),
}

# Server errors go to stderr, where the test run shows them.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "task_ferry": {"handlers": ["console"], "level": "WARNING"},
        "django.request": {"handlers": ["console"], "level": "ERROR"},
    },
}
