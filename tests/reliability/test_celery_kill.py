"""A real Celery worker (prefork, Redis and RabbitMQ brokers) SIGKILLed mid-job: the job is
failed as "worker lost" by the sweep within the heartbeat timeout, no job is lost, and the user
can start a new job of the type at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

pytest.importorskip("celery", reason="celery is not installed")

from celery import Celery

from task_ferry.exceptions import MaxJobCountExceeded
from task_ferry.handler import JobHandler
from task_ferry.models import ENDED_STATES, Heartbeat
from tests.reliability.helpers import hook_calls, state_of
from tests.reliability.timing import FAST_HEARTBEAT
from tests.testapp.models import Marker
from tests.waiting import wait_for
from tests.workers.celery_fixtures import (
    BROKER_URLS,
    CeleryProcess,
    current_celery_app,
    start_celery,
    unique_queue,
    worker_env,
)

pytestmark = pytest.mark.worker

SWEEP_INTERVAL = 0.25


def start_worker(broker: str, queue: str, overrides: dict) -> CeleryProcess:
    env = worker_env(BROKER_URLS[broker])
    env["DJANGO_SETTINGS_MODULE"] = "tests.reliability.celery_settings"
    env["TF_WORKER_SETTINGS"] = json.dumps(overrides)
    args = [
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        f"--queues={queue}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    return start_celery(args, env, ready_text=" ready.")


def sigkill_worker(worker: CeleryProcess) -> None:
    """SIGKILL the worker's main process and its pool processes, as a lost host would."""
    pool = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(worker.process.pid)], capture_output=True, text=True
    ).stdout.split()
    for pid in [worker.process.pid, *map(int, pool)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.process.wait(10)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_sigkilled_celery_worker(broker, ferry, processes, user, capsys):
    queue = unique_queue(f"reliability-{broker}")
    overrides = {**FAST_HEARTBEAT, "MAX_JOBS_PER_USER_PER_TYPE": 1}
    ferry(**overrides, EXECUTOR="task_ferry.executors.celery.CeleryExecutor", CELERY_QUEUE=queue)
    app = Celery(f"tf-reliability-{broker}", broker=BROKER_URLS[broker], set_as_current=False)
    workers = [start_worker(broker, queue, overrides)]
    processes.sweeper(SWEEP_INTERVAL)
    try:
        with current_celery_app(app):
            victim = JobHandler.create_and_start(
                user, "scripted", steps=400, tick_delay=0.05, marker=f"killed-{broker}"
            )
            queued = [JobHandler.create_and_start(None, "scripted", steps=3) for _ in range(4)]
            wait_for(lambda: Heartbeat.objects.filter(job_id=victim.pk).exists(), timeout=20)
            with pytest.raises(MaxJobCountExceeded):
                JobHandler.create_and_start(user, "scripted")

            sigkill_worker(workers[0])
            killed_at = time.monotonic()
            wait_for(lambda: state_of(victim) == "failed", timeout=10, interval=0.01)
            detection = time.monotonic() - killed_at

            # The slot is free at once; a new worker runs what the dead one left.
            retry = JobHandler.create_and_start(user, "scripted", steps=3)
            workers.append(start_worker(broker, queue, overrides))
            everything = [victim, *queued, retry]
            wait_for(lambda: all(state_of(j) in ENDED_STATES for j in everything), timeout=30)
    finally:
        for worker in workers:
            worker.stop()
        with app.connection_for_write() as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_purge(queue)
        app.close()

    victim = JobHandler.get_job(user, victim.pk)
    assert "worker lost" in victim.human_readable_error
    assert hook_calls(victim, "on_error") == 1
    assert not Marker.objects.filter(name=f"killed-{broker}").exists()
    assert [state_of(j) for j in [*queued, retry]] == ["finished"] * 5
    lost = [j.pk for j in everything if state_of(j) not in ENDED_STATES]
    assert lost == []
    bound = FAST_HEARTBEAT["HEARTBEAT_TIMEOUT"] + FAST_HEARTBEAT["HEARTBEAT_INTERVAL"]
    assert detection < bound + SWEEP_INTERVAL + 1  # slack for a loaded CI machine
    with capsys.disabled():
        print(
            f"\n[reliability] celery ({broker}) worker SIGKILL: detected after {detection:.2f}s; "
            f"jobs lost: {len(lost)} of {len(everything)}"
        )
