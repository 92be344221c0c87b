"""Run as ``python -m tests.reliability.sqlite_race DB_PATH SCENARIO`` (SCENARIO: create, sweep).

On a SQLite file in WAL mode, as the example project runs, another connection (a worker, say)
commits a write just after the first statement of task_ferry's transaction. Prints what
happened as JSON: the error task_ferry raised, if any, and how the other write went.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from typing import Any

import django


def main(path: str, scenario: str) -> dict[str, Any]:
    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test import override_settings

    from task_ferry.handler import JobHandler
    from task_ferry.models import Job

    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("CREATE TABLE other_writes (n INTEGER)")
    user = get_user_model().objects.create(username="racer")
    other: dict[str, Any] = {"armed": False, "outcome": None}

    def other_write() -> None:
        db = sqlite3.connect(path, timeout=10, isolation_level=None)
        try:
            db.execute("INSERT INTO other_writes VALUES (1)")
            other["outcome"] = "committed"
        except sqlite3.Error as exc:
            other["outcome"] = f"failed: {exc}"
        finally:
            db.close()

    def after_first_statement(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        result = execute(sql, params, many, context)
        if other["armed"] and connection.in_atomic_block:
            other["armed"] = False
            other["thread"] = threading.Thread(target=other_write)
            other["thread"].start()
            # Commits at once unless this transaction holds the write lock; then it waits.
            other["thread"].join(1.0)
        return result

    queueing = override_settings(
        TASK_FERRY={
            **django.conf.settings.TASK_FERRY,
            "EXECUTOR": "tests.reliability.executors.QueueingExecutor",
        }
    )
    error = None
    with queueing, connection.execute_wrapper(after_first_statement):
        try:
            if scenario == "create":
                other["armed"] = True
                JobHandler.create_and_start(user, "limited")
            else:
                from tests.reliability.helpers import start_lost_job

                start_lost_job(user)
                other["armed"] = True
                JobHandler.sweep_stale_jobs()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    if "thread" in other:
        other["thread"].join()
    states = list(Job.objects.values_list("state", flat=True))
    return {"error": error, "other_write": other["outcome"], "states": states}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
