"""Settings of the Celery workers the reliability tests start: the workers' usual settings with
``TF_WORKER_SETTINGS`` (JSON) merged over ``TASK_FERRY``, for a fast heartbeat."""

import json
import os

from tests.workers.celery_settings import *  # noqa: F403
from tests.workers.celery_settings import TASK_FERRY

TASK_FERRY = {**TASK_FERRY, **json.loads(os.environ.get("TF_WORKER_SETTINGS", "{}"))}
