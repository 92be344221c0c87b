"""The test project's Celery app, set up the way the docs tell users to.

Workers: ``celery -A tests.celery_app worker``. The broker comes from
TASK_FERRY_TEST_BROKER_URL; TASK_FERRY_TEST_BEAT_EVERY (seconds) adds task_ferry's beat
entries with that interval, on the queue TASK_FERRY_TEST_BEAT_QUEUE.
"""

import os

from celery import Celery

from task_ferry.executors.celery import beat_schedule

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.broker_url = os.environ.get("TASK_FERRY_TEST_BROKER_URL", "redis://127.0.0.1:6379/14")
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_connection_retry_on_startup = True
# Keep database connections across tasks (Celery closes them around every task otherwise).
app.conf.CELERY_DB_REUSE_MAX = 100
app.autodiscover_tasks()

# TASK_FERRY_TEST_VISIBILITY_TIMEOUT (seconds): the Redis broker hands an unacked message out
# again that long after its delivery, checked every second.
if os.environ.get("TASK_FERRY_TEST_VISIBILITY_TIMEOUT"):
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["TASK_FERRY_TEST_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

if os.environ.get("TASK_FERRY_TEST_BEAT_EVERY"):
    every = float(os.environ["TASK_FERRY_TEST_BEAT_EVERY"])
    app.conf.beat_schedule = beat_schedule(
        cleanup_every=every, sweep_every=every, queue=os.environ["TASK_FERRY_TEST_BEAT_QUEUE"]
    )
