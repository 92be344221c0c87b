"""SQLite with a worker process writing beside the web server, as the example project runs:
task_ferry's transactions that read before they write take the write lock first, so a write
committed meanwhile makes them wait instead of failing with "database is locked"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def race(tmp_path: Path, scenario: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "TASK_FERRY_TEST_DB": "sqlite",
        "TASK_FERRY_TEST_STORE": "cache",
        "TASK_FERRY_TEST_SQLITE": str(tmp_path / "db.sqlite3"),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.reliability.sqlite_race",
            env["TASK_FERRY_TEST_SQLITE"],
            scenario,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(("scenario", "states"), [("create", ["pending"]), ("sweep", ["failed"])])
def test_a_write_committed_mid_transaction_is_waited_for(tmp_path: Path, scenario, states) -> None:
    """create_and_start() of a type with max_count (which reads the user's live jobs before
    inserting) and the stale-job sweep (which reads the job before failing it)."""
    outcome = race(tmp_path, scenario)

    assert outcome["error"] is None
    assert outcome["states"] == states
    assert outcome["other_write"] == "committed"
