"""SQLite with a worker process writing beside the web server, as the example project runs:
task_ferry's transactions that read before they write take the write lock first, so a write
committed meanwhile makes them wait instead of failing with "database is locked". And two
cleanups at once on one database file, in processes of their own."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from task_ferry.models import Job
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """The test settings on the SQLite file ``tmp_path/db.sqlite3``, whatever this run's."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "TASK_FERRY_TEST_DB": "sqlite",
        "TASK_FERRY_TEST_STORE": "cache",
        "TASK_FERRY_TEST_SQLITE": str(tmp_path / "db.sqlite3"),
    }


def run_module(module: str, *args: str, env: dict[str, str]) -> Any:
    """Run ``python -m module args`` to its end; the JSON of the last line it printed."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def race(tmp_path: Path, scenario: str) -> dict[str, Any]:
    env = sqlite_env(tmp_path)
    return run_module(
        "tests.reliability.sqlite_race", env["TASK_FERRY_TEST_SQLITE"], scenario, env=env
    )


@pytest.mark.parametrize(("scenario", "states"), [("create", ["pending"]), ("sweep", ["failed"])])
def test_a_write_committed_mid_transaction_is_waited_for(tmp_path: Path, scenario, states) -> None:
    """create_and_start() of a type with max_count (which reads the user's live jobs before
    inserting) and the stale-job sweep (which reads the job before failing it)."""
    outcome = race(tmp_path, scenario)

    assert outcome["error"] is None
    assert outcome["states"] == states
    assert outcome["other_write"] == "committed"


def cleanup_process(env: dict[str, str], calls: Path, hook_seconds: float) -> subprocess.Popen:
    """A cleanup in a process of its own (tests/reliability/sqlite_cleanup.py), set up and
    waiting for a line on its stdin to start."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.reliability.sqlite_cleanup",
            "run",
            str(calls),
            str(hook_seconds),
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line != "ready\n":
        process.kill()
        raise AssertionError(f"cleanup process not ready: {line!r}{process.communicate()[1]}")
    return process


def start(process: subprocess.Popen) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


def finish(process: subprocess.Popen) -> tuple[dict[str, Any], str]:
    """What the cleanup printed (how many jobs it deleted, whether it had fcntl), and what it
    logged."""
    try:
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1]), err


def setup_jobs(env: dict[str, str], count: int) -> list[int]:
    return run_module("tests.reliability.sqlite_cleanup", "setup", str(count), env=env)


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl, no lock: see the next test")
def test_two_cleanup_processes_on_one_database_file_call_before_delete_once_per_job(
    tmp_path: Path,
) -> None:
    """Cron's cleanup and Celery beat's on one SQLite file: both loaded the same expired jobs
    and called each one's before_delete twice (a file removed twice, a refund sent twice)."""
    env = sqlite_env(tmp_path)
    expired = setup_jobs(env, 40)
    calls = tmp_path / "calls"
    first = cleanup_process(env, calls, hook_seconds=0.05)
    second = cleanup_process(env, calls, hook_seconds=0.05)
    start(first)
    # The first is in its hooks, with 2 seconds of them to go: the second starts meanwhile.
    wait_for(lambda: calls.exists() and calls.read_text(), what="the first cleanup's hooks")
    start(second)
    (first_outcome, log_first), (second_outcome, log_second) = finish(first), finish(second)

    hooked = Counter(int(line) for line in calls.read_text().split())
    assert hooked == Counter({pk: 1 for pk in expired})
    assert (first_outcome["deleted"], second_outcome["deleted"]) == (len(expired), 0)
    assert "another cleanup is running; this one stops" in log_second
    assert "another cleanup" not in log_first
    with contextlib.closing(sqlite3.connect(env["TASK_FERRY_TEST_SQLITE"])) as db:
        assert db.execute(f"SELECT count(*) FROM {Job._meta.db_table}").fetchone() == (0,)
    # The lock went with the first: the next cleanup runs, its lock file left behind or not.
    more = setup_jobs(env, 3)
    third = cleanup_process(env, calls, hook_seconds=0)
    start(third)
    assert finish(third)[0]["deleted"] == len(more)


@pytest.mark.skipif(sys.platform == "win32", reason="hides fcntl as it is missing on Windows")
def test_without_fcntl_a_cleanup_on_a_database_file_runs_without_a_lock(tmp_path: Path) -> None:
    """As on Windows: the cleanup runs as before the lock, and leaves no lock file."""
    env = {**sqlite_env(tmp_path), "WITHOUT_FCNTL": "1"}
    expired = setup_jobs(env, 3)
    process = cleanup_process(env, tmp_path / "calls", hook_seconds=0)
    start(process)
    outcome, log = finish(process)
    assert outcome == {"deleted": len(expired), "fcntl": False}
    assert "another cleanup" not in log
    assert [path.name for path in tmp_path.iterdir() if path.suffix == ".lock"] == []
