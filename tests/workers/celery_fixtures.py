"""Real Celery workers for the tests: a prefork ``celery worker`` subprocess per broker, shared
by the tests of a session, on queues whose names are unique to this session so no other
worker on the shared brokers steals its messages."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, _state
from django.conf import settings
from django.db import connection

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
SESSION = uuid.uuid4().hex[:8]
BROKER_URLS = {
    "redis": os.environ.get("TASK_FERRY_TEST_CELERY_REDIS_URL", "redis://127.0.0.1:6379/14"),
    "amqp": os.environ.get("TASK_FERRY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}
WORKER_START_TIMEOUT = 30


# Every queue name this session handed out, for delete_session_queues().
SESSION_QUEUES: set[str] = set()


def unique_queue(name: str) -> str:
    queue = f"tf-{SESSION}-{name}"
    SESSION_QUEUES.add(queue)
    return queue


def delete_session_queues() -> None:
    """Delete this session's queues from RabbitMQ, which keeps declared queues (empty or
    not) until they are deleted; on Redis a queue is a list, gone once empty."""
    if not SESSION_QUEUES:
        return
    app = Celery("tf-tests-cleanup", broker=BROKER_URLS["amqp"], set_as_current=False)
    try:
        with app.connection_for_write() as conn, contextlib.suppress(Exception):
            channel = conn.channel()
            for queue in sorted(SESSION_QUEUES):
                channel.queue_delete(queue)
    finally:
        app.close()


def worker_env(broker_url: str, **extra: str) -> dict[str, str]:
    """Environment of a worker process: this checkout, the test database (already created by
    pytest-django) and this session's progress-store keys."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        DJANGO_SETTINGS_MODULE="tests.workers.celery_settings",
        TASK_FERRY_TEST_DB_NAME=str(connection.settings_dict["NAME"]),
        TASK_FERRY_TEST_KEY_PREFIX=settings.TASK_FERRY["KEY_PREFIX"],
        TASK_FERRY_TEST_BROKER_URL=broker_url,
        **extra,
    )
    return env


@dataclass
class CeleryProcess:
    """A ``celery`` subprocess with its combined output in a log file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    nodename: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def output(self) -> str:
        """The end of the log, for a failing test's message."""
        command = self.process.args[5]  # after "python -m celery -A tests.celery_app"
        return f"--- celery {command} ({self.log_path}) ---\n{self.log()[-6000:]}"

    def wait_for_log(self, text: str, timeout: float = 15) -> None:
        wait_for(lambda: text in self.log(), timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            # A warm shutdown would wait for running jobs; the tests are done with them.
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class Outputs:
    """The logs of several processes in one failure message (``wait_for(worker=...)``)."""

    processes: list[CeleryProcess]

    def output(self) -> str:
        return "\n".join(process.output() for process in self.processes)


def start_celery(args: list[str], env: dict[str, str], ready_text: str) -> CeleryProcess:
    nodename = f"tf-{SESSION}-{uuid.uuid4().hex[:6]}@%h"
    command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", *args]
    if args[0] == "worker":
        command += ["-n", nodename]
    with tempfile.NamedTemporaryFile(prefix="tf-celery-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    celery = CeleryProcess(process, Path(log.name), nodename.replace("%h", os.uname()[1]))
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while ready_text not in celery.log():
        if process.poll() is not None or time.monotonic() > deadline:
            celery.stop()
            pytest.fail(f"celery {args[0]} did not start:\n{celery.log()[-3000:]}")
        time.sleep(0.1)
    return celery


def start_worker(
    broker_url: str, queues: list[str], concurrency: int = 2, **extra_env: str
) -> CeleryProcess:
    args = [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        "--loglevel=INFO",
        # Gossip and mingle would talk to other helpers' workers on the shared brokers.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    return start_celery(args, worker_env(broker_url, **extra_env), ready_text=" ready.")


@dataclass
class CeleryWorker:
    """A running worker and a producer app on the same broker."""

    broker: str
    queue: str
    process: CeleryProcess
    app: Celery

    def add_consumer(self, queue: str) -> None:
        reply = self.app.control.add_consumer(
            queue, destination=[self.process.nodename], reply=True, timeout=5
        )
        assert reply, f"worker {self.process.nodename} did not answer add_consumer"

    def cancel_consumer(self, queue: str) -> None:
        self.app.control.cancel_consumer(
            queue, destination=[self.process.nodename], reply=True, timeout=5
        )

    def message_count(self, queue: str) -> int:
        """Messages waiting in ``queue`` that no worker has taken."""
        with self.app.connection_for_write() as conn:
            try:
                declared = conn.default_channel.queue_declare(queue, passive=True)
            except conn.channel_errors:
                return 0  # Not declared yet: nothing was ever sent to it.
            return int(declared.message_count)

    def purge(self, queue: str) -> None:
        with self.app.connection_for_write() as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_purge(queue)


@pytest.fixture(scope="session", params=["redis", "amqp"])
def celery_worker(
    request: pytest.FixtureRequest, django_db_setup: None, django_db_blocker: Any
) -> Iterator[CeleryWorker]:
    """A prefork worker (2 processes) on this session's default queue, once per broker."""
    broker = request.param
    queue = unique_queue(f"default-{broker}")
    app = Celery(f"tf-tests-{broker}", broker=BROKER_URLS[broker], set_as_current=False)
    with django_db_blocker.unblock():
        process = start_worker(BROKER_URLS[broker], [queue])
    try:
        yield CeleryWorker(broker, queue, process, app)
    finally:
        process.stop()
        with contextlib.suppress(Exception):
            CeleryWorker(broker, queue, process, app).purge(queue)
        app.close()


@pytest.fixture
def redis_celery_worker(celery_worker: CeleryWorker) -> CeleryWorker:
    """The Redis-broker worker only, for tests of one broker's behaviour."""
    if celery_worker.broker != "redis":
        pytest.skip("covered with the Redis broker")
    return celery_worker


@pytest.fixture
def celery_executor(
    celery_worker: CeleryWorker, settings: Any, transactional_db: None
) -> Iterator[CeleryWorker]:
    """TASK_FERRY set to the CeleryExecutor, sending through the worker's broker."""
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": celery_worker.queue,
    }
    with current_celery_app(celery_worker.app):
        yield celery_worker


@contextlib.contextmanager
def current_celery_app(app: Celery) -> Iterator[Celery]:
    """Make ``app`` this thread's current Celery app, as a project's celery.py does."""
    previous = _state._tls.current_app
    previous_flag = app.set_as_current
    app.set_as_current = True
    _state._set_current_app(app)
    try:
        yield app
    finally:
        app.set_as_current = previous_flag
        _state._set_current_app(previous)
