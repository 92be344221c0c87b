"""Fixtures for the fault tests: small heartbeat settings, worker processes started by PID, and a
redis-server of our own on a spare port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.db import connection

from tests.pgbouncer import PGBOUNCER, PgBouncer
from tests.ports import free_port
from tests.redis_server import RedisServer
from tests.reliability.executors import QueueingExecutor
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.reliability.test_bad_input import counter

    if any(counter.values()):
        terminalreporter.write_line(
            f"bad-input cases tried: {counter} (total {sum(counter.values())})"
        )


@pytest.fixture
def ferry(settings: Any) -> Callable[..., dict[str, Any]]:
    """Change TASK_FERRY settings for this test: ``ferry(HEARTBEAT_TIMEOUT=1)``."""

    def configure(**overrides: Any) -> dict[str, Any]:
        settings.TASK_FERRY = {**settings.TASK_FERRY, **overrides}
        return dict(settings.TASK_FERRY)

    return configure


@pytest.fixture
def reliability_types() -> Iterator[None]:
    """Registers the job types of tests/reliability/job_types.py for one test."""
    from task_ferry.registry import job_type_registry
    from tests.reliability import job_types

    registered = job_type_registry.register_module(job_types)
    yield
    for job_type in registered:
        job_type_registry.unregister(job_type)


@pytest.fixture
def retired_type() -> Iterator[Callable[[], None]]:
    """A job type whose jobs outlive it: registered to create them, then removed (by calling
    the fixture's value), as by a deploy that dropped it (or a worker that does not have it
    yet)."""
    from task_ferry.registry import job_type_registry
    from tests.testapp.job_types import ScriptedJobType

    class RetiredJobType(ScriptedJobType):
        type = "retired"

    job_type_registry.register(RetiredJobType)
    yield lambda: job_type_registry.unregister("retired")
    if "retired" in job_type_registry:
        job_type_registry.unregister("retired")


@pytest.fixture
def queueing(ferry: Callable[..., dict[str, Any]]) -> type[QueueingExecutor]:
    """Dispatch on commit to a recorder; jobs stay pending until something runs them."""
    ferry(EXECUTOR="tests.reliability.executors.QueueingExecutor")
    QueueingExecutor.dispatched = []
    return QueueingExecutor


class WorkerProcess:
    def __init__(self, args: list[str], log: Path, settings: dict[str, Any]) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            # The worker must see the rows this test commits, so it uses the test database.
            "TASK_FERRY_TEST_DB_NAME": connection.settings_dict["NAME"],
            "TF_WORKER_SETTINGS": json.dumps(settings),
        }
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.worker", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, text: str = "ready") -> None:
        """Wait until ``text`` shows in its output; it must not have exited meanwhile."""
        wait_for(lambda: text in self.output() or self.proc.poll() is not None, timeout=30)
        assert self.proc.poll() is None, self.output()

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log_file.close()


@pytest.fixture
def processes(transactional_db: None, tmp_path: Path, settings: Any) -> Iterator[Any]:
    """Start worker processes with this test's TASK_FERRY settings; all are killed at the end."""
    started: list[WorkerProcess] = []

    class Starter:
        def worker(self, *, heartbeat: bool = True) -> WorkerProcess:
            proc = self.start(["run" if heartbeat else "run-no-heartbeat"])
            proc.wait_ready()
            return proc

        def sweeper(self, interval: float) -> WorkerProcess:
            # The sweeper never dispatches, so the executor's checks are not its business.
            proc = self.start(
                ["manage", "task_ferry_sweep", f"--interval={interval}", "--skip-checks"]
            )
            # Returned once it sweeps: a test that times how soon a lost job is failed must
            # not count the seconds a loaded machine takes to start Django.
            proc.wait_ready("Sweeping every")
            return proc

        def start(self, args: list[str]) -> WorkerProcess:
            log = tmp_path / f"process-{len(started)}.log"
            proc = WorkerProcess(args, log, dict(settings.TASK_FERRY))
            started.append(proc)
            return proc

    yield Starter()
    for proc in started:
        # A stopped process must be continued before it can die.
        if proc.proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, left out of the settings (unlike tests/conftest.py's):
    each test names it with ``ferry(REDIS_URL=...)``, for its worker processes too."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pgbouncer(tmp_path: Path) -> Iterator[PgBouncer]:
    """Django's default connection goes through a PgBouncer in transaction mode for the test."""
    if connection.vendor != "postgresql":
        pytest.skip("PgBouncer pools PostgreSQL connections")
    if not shutil.which(PGBOUNCER):
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    bouncer = PgBouncer(free_port(), tmp_path)
    settings_dict = connection.settings_dict
    original = dict(settings_dict)
    bouncer.start(
        settings_dict["HOST"] or "127.0.0.1",
        int(settings_dict["PORT"] or 5432),
        settings_dict["USER"] or "postgres",
    )
    connection.close()
    settings_dict.update(HOST="127.0.0.1", PORT=str(bouncer.port))
    try:
        yield bouncer
    finally:
        connection.close()
        settings_dict.clear()
        settings_dict.update(original)
        bouncer.stop()
