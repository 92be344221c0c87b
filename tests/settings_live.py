"""Settings of a test server process (uvicorn) started by a test or a benchmark: the test
project's, plus basic auth for HTTP clients, and jobs left pending (the test runs them)."""

import os

from tests.settings import *  # noqa: F403
from tests.settings import TASK_FERRY

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
}

TASK_FERRY = {
    **TASK_FERRY,
    "EXECUTOR": "tests.api.live.HoldExecutor",
    # The test process and the server must share progress-store keys.
    "KEY_PREFIX": os.environ.get("TASK_FERRY_TEST_KEY_PREFIX", TASK_FERRY["KEY_PREFIX"]),
    "SSE_KEEPALIVE": float(os.environ.get("TASK_FERRY_TEST_SSE_KEEPALIVE", "15")),
}
