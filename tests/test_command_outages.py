"""The management commands run as an operator runs them (``python -m django <command>`` from
cron or a container), with the database or the progress store out of reach."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.utils import timezone

from task_ferry.management.databases import engine_name
from task_ferry.models import Job, JobState
from tests.jobs import make_job
from tests.ports import free_port
from tests.reliability.helpers import state_of
from tests.terminal import TerminalOutput
from tests.testapp.models import HookCall
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
DB_PASSWORD = "db-Secret-4711"
REDIS_PASSWORD = "redis-Secret-0815"

COMMANDS = [
    ["task_ferry_cleanup"],
    ["task_ferry_cleanup", "--dry-run"],
    ["task_ferry_sweep"],
    ["task_ferry_jobs"],
    ["task_ferry_jobs", "--watch"],
]


def command_env(**env: str) -> dict[str, str]:
    # Without PYTHONUNBUFFERED, as under systemd or Docker: a long-lived command's lines must
    # reach its log file as it writes them.
    inherited = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**inherited, "PYTHONPATH": str(ROOT), **env}


def manage(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", *args, "--settings=tests.settings"],
        cwd=ROOT,
        env=command_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def unreachable_database() -> dict[str, str]:
    """Settings of the test project that point ``default`` at a database nobody serves."""
    if connection.vendor == "sqlite":
        return {"TASK_FERRY_TEST_SQLITE": "/nonexistent-directory/task-ferry.sqlite3"}
    return {
        "TASK_FERRY_TEST_DB_PORT": str(free_port()),
        "TASK_FERRY_TEST_DB_PASSWORD": DB_PASSWORD,
    }


def this_database() -> dict[str, str]:
    """Settings of the test project that reach the database this test commits to."""
    if connection.vendor == "sqlite":
        if connection.is_in_memory_db():
            pytest.skip("another process cannot open an in-memory SQLite database")
        return {"TASK_FERRY_TEST_SQLITE": connection.settings_dict["NAME"]}
    return {"TASK_FERRY_TEST_DB_NAME": connection.settings_dict["NAME"]}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_unreachable_database_is_one_line_on_stderr_and_exit_status_1(command):
    env = unreachable_database()
    result = manage(*command, **env)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "CommandError: Could not connect to the database DATABASES['default'] ("
    )
    if "TASK_FERRY_TEST_DB_PORT" in env:
        assert f"127.0.0.1:{env['TASK_FERRY_TEST_DB_PORT']}" in lines[0]
        assert "Check that the server is running" in lines[0]
        assert DB_PASSWORD not in result.stdout + result.stderr
    else:
        assert "/nonexistent-directory/task-ferry.sqlite3" in lines[0]


@pytest.fixture
def frozen_server():
    """A server that takes connections and never answers: a frozen server, or a network that
    drops its packets. Its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def take() -> None:
        while True:
            try:
                taken.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=take, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for sock in taken:
        sock.close()


def test_a_frozen_database_server_is_given_up_on_after_the_connect_timeout(frozen_server):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite has no server")
    started = time.monotonic()
    result = manage(
        "task_ferry_cleanup",
        TASK_FERRY_TEST_DB_PORT=str(frozen_server),
        TASK_FERRY_TEST_DB_CONNECT_TIMEOUT="2",
    )
    assert time.monotonic() - started < 15
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "CommandError: Could not connect to the database DATABASES['default'] ("
    )
    assert f"127.0.0.1:{frozen_server}," in lines[0]


@pytest.mark.django_db
def test_a_refused_password_is_one_line_that_does_not_show_it():
    if connection.vendor != "mysql":
        pytest.skip("the test's PostgreSQL trusts local connections; SQLite has no password")
    result = manage(
        "task_ferry_cleanup", **this_database(), TASK_FERRY_TEST_DB_PASSWORD=DB_PASSWORD
    )
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "CommandError: Could not connect to the database DATABASES['default'] ("
    )
    assert "Access denied for user 'root'" in lines[0]
    assert DB_PASSWORD not in result.stdout + result.stderr


def test_traceback_option_still_shows_the_drivers_error():
    result = manage("task_ferry_sweep", "--traceback", **unreachable_database())
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "OperationalError" in result.stderr


class Relay:
    """A TCP relay to the test database that can be cut (every connection closed, nothing
    listening) and restored: the database going away and coming back, for real, without
    stopping a server others use."""

    def __init__(self) -> None:
        self.port = free_port()
        settings = connection.settings_dict
        self.target = (settings["HOST"], int(settings["PORT"]))
        self.listener: socket.socket | None = None
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()

    @staticmethod
    def _pipe(one: socket.socket, other: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(one, selectors.EVENT_READ, other)
            selector.register(other, selectors.EVENT_READ, one)
            while True:
                for key, _ in selector.select():
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)
                    except OSError:
                        return


@pytest.fixture
def relay():
    if connection.vendor == "sqlite":
        pytest.skip("SQLite has no server to relay")
    relay = Relay()
    yield relay
    relay.cut()


class Sweeper:
    """``task_ferry_sweep --interval`` in a process of its own, its output read as it comes."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.out = tmp_path / "sweeper.out"
        self.err = tmp_path / "sweeper.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", "task_ferry_sweep", "--interval", "0.2", "-v", "2"],
            cwd=ROOT,
            env=command_env(**env, DJANGO_SETTINGS_MODULE="tests.settings"),
            stdout=self.out.open("w"),
            stderr=self.err.open("w"),
        )

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for_more(self, read, text: str, count: int = 1) -> None:
        start = read().count(text)
        wait_for(
            lambda: read().count(text) >= start + count or self.proc.poll() is not None,
            timeout=30,
            what=f"{count} more {text!r}",
        )
        assert self.proc.poll() is None, self.stderr()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.mark.django_db(transaction=True)
def test_the_long_lived_sweeper_retries_through_a_database_outage(relay, tmp_path):
    env = {**this_database(), "TASK_FERRY_TEST_DB_PORT": str(relay.port)}
    sweeper = Sweeper(tmp_path, env)
    try:
        # Down from the start: nothing listens.
        sweeper.wait_for_more(sweeper.stderr, "Sweep failed", 2)
        relay.open()
        sweeper.wait_for_more(sweeper.stdout, "No stale jobs.", 2)
        # Lost while connected: the connection is closed under it, and nothing listens.
        relay.cut()
        sweeper.wait_for_more(sweeper.stderr, "Sweep failed", 2)
        relay.open()
        sweeper.wait_for_more(sweeper.stdout, "No stale jobs.", 2)
    finally:
        sweeper.stop()
    errors = sweeper.stderr()
    assert "Traceback" not in errors
    lines = errors.splitlines()
    assert lines and all(
        line.startswith("Sweep failed, retrying in 0.2s: ") and f":{relay.port}, " in line
        for line in lines
    ), errors
    assert any("Could not connect to the database DATABASES['default']" in line for line in lines)


@pytest.mark.django_db(transaction=True)
def test_watch_stops_with_one_line_when_the_database_goes_away(relay, user, tmp_path):
    job = make_job(user)
    relay.open()
    env = {**this_database(), "TASK_FERRY_TEST_DB_PORT": str(relay.port)}
    out = tmp_path / "watch.out"
    with out.open("w") as stdout:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "django", "task_ferry_jobs", "--watch", "--interval", "0.2"],
            cwd=ROOT,
            env=command_env(**env, DJANGO_SETTINGS_MODULE="tests.settings"),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: f"#{job.pk} scripted alice pending" in out.read_text(), timeout=30)
            # Its connection, open between updates, is closed under it.
            relay.cut()
            _, stderr = watcher.communicate(timeout=30)
        finally:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 1, stderr
    assert stderr.startswith(
        "CommandError: Lost the connection to the database DATABASES['default'] "
        f"({engine_name(connections['default'])}, 127.0.0.1:{relay.port}, "
    ), stderr
    assert len(stderr.splitlines()) == 1, stderr


def unreachable_redis() -> dict[str, str]:
    return {
        "TASK_FERRY_TEST_STORE": "redis",
        "TASK_FERRY_TEST_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
    }


def unreachable_redis_settings() -> dict[str, str]:
    return {
        "REDIS_URL": unreachable_redis()["TASK_FERRY_TEST_REDIS_URL"],
        "PROGRESS_STORE": "task_ferry.stores.redis.RedisProgressStore",
    }


@pytest.fixture
def frozen_redis(frozen_server):
    return {
        "TASK_FERRY_TEST_STORE": "redis",
        "TASK_FERRY_TEST_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{frozen_server}/0",
    }


def assert_redis_password_hidden(result: subprocess.CompletedProcess[str]) -> None:
    assert REDIS_PASSWORD not in result.stdout + result.stderr
    assert "redis://:***@127.0.0.1:" in result.stderr


# A command against a frozen Redis: the system check's PING and the command's own first call
# each wait out the store's 2-second socket timeout, once.
FROZEN_REDIS_BOUND = 12


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("store", ["down", "frozen"])
def test_jobs_shows_the_databases_progress_and_says_why_when_the_store_is_out(
    user, store, frozen_redis
):
    running = make_job(user, JobState.STARTED, progress_percentage=30, progress_state="halfway")
    redis = unreachable_redis() if store == "down" else frozen_redis
    started = time.monotonic()
    result = manage("task_ferry_jobs", **this_database(), **redis)
    assert time.monotonic() - started < FROZEN_REDIS_BOUND
    assert result.returncode == 0, result.stderr
    assert f"#{running.pk} scripted alice started 30% halfway" in result.stdout
    assert "Traceback" not in result.stderr
    assert (
        "Progress store unavailable, showing progress as the database has it (a running job's "
        "is updated when it ends): Could not read from Redis at redis://:***@127.0.0.1:"
    ) in result.stderr
    assert_redis_password_hidden(result)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("store", ["down", "frozen"])
def test_cleanup_deletes_through_a_store_outage_and_says_what_it_left(user, store, frozen_redis):
    old = make_job(user, JobState.FINISHED)
    Job.objects.filter(pk=old.pk).update(finished_at=timezone.now() - datetime.timedelta(days=9))
    recent = make_job(user, JobState.FINISHED, finished_at=timezone.now())
    redis = unreachable_redis() if store == "down" else frozen_redis
    started = time.monotonic()
    result = manage("task_ferry_cleanup", **this_database(), **redis)
    assert time.monotonic() - started < FROZEN_REDIS_BOUND
    assert result.returncode == 0, result.stderr
    assert "Deleted 1 ended job(s)" in result.stdout
    assert list(Job.objects.values_list("pk", flat=True)) == [recent.pk]
    assert HookCall.objects.filter(job_id=old.pk, hook="before_delete").exists()
    assert "Traceback" not in result.stderr
    assert "snapshots of 1 of 1 deleted jobs not forgotten" in result.stderr
    assert_redis_password_hidden(result)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("store", ["down", "frozen"])
def test_sweep_fails_lost_jobs_through_a_store_outage(user, store, frozen_redis):
    # Started two hours ago, and its worker never beat: lost.
    lost = make_job(user, JobState.STARTED, started_at=timezone.now() - datetime.timedelta(hours=2))
    redis = unreachable_redis() if store == "down" else frozen_redis
    started = time.monotonic()
    result = manage("task_ferry_sweep", **this_database(), **redis)
    assert time.monotonic() - started < FROZEN_REDIS_BOUND
    assert result.returncode == 0, result.stderr
    assert "Failed 1 stale job(s)." in result.stdout
    assert state_of(lost) == "failed"
    assert "Traceback" not in result.stderr
    assert "Sweep: progress store unavailable" in result.stderr
    assert_redis_password_hidden(result)


def test_live_bars_say_in_their_header_that_the_store_is_out(db, user, settings, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    settings.TASK_FERRY = {**settings.TASK_FERRY, **unreachable_redis_settings()}
    make_job(user, JobState.STARTED, progress_percentage=30, progress_state="halfway")
    out, err = TerminalOutput(), io.StringIO()
    call_command("task_ferry_jobs", stdout=out, stderr=err)
    header, bar = out.getvalue().splitlines()
    assert header.endswith(" (progress store unreachable: progress from the database)")
    assert bar.endswith(" 30%          halfway")
    # The frame is redrawn in place: a line on the same terminal would be left behind.
    assert err.getvalue() == ""
