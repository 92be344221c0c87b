"""Run as ``python -m tests.reliability.sqlite_cleanup ROLE ...`` with the test settings on a
SQLite file (``TASK_FERRY_TEST_SQLITE``), for the test of two cleanups at once on one file.

``setup COUNT``: migrate, create COUNT expired jobs of several types and print their ids as JSON.

``run CALLS HOOK_SECONDS``: a cleanup in a process of its own, as cron's and Celery beat's are.
Each job type's ``before_delete`` appends the job's id to the file CALLS, then sleeps
HOOK_SECONDS (a file removed from S3, say). Prints ``ready`` once set up, waits for a line on
stdin, runs ``JobHandler.cleanup_old_jobs()`` and prints how many jobs it deleted as JSON.
With ``WITHOUT_FCNTL=1`` in its environment, the module ``fcntl`` cannot be imported, as on
Windows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import django


def setup(count: int) -> list[int]:
    from django.core.management import call_command

    from tests.reliability.bulk import bulk_jobs

    call_command("migrate", verbosity=0)
    return bulk_jobs(count)


def run(calls: str, hook_seconds: float) -> dict[str, Any]:
    from django.db import connection

    from task_ferry import cleanup
    from task_ferry.handler import JobHandler
    from task_ferry.registry import job_type_registry

    def before_delete(self: Any, job: Any) -> None:
        # One write() of a short line to a file opened for appending: whole lines, whichever
        # process writes.
        fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{job.pk}\n".encode())
        finally:
            os.close(fd)
        time.sleep(hook_seconds)

    for job_type in job_type_registry.all():
        type(job_type).before_delete = before_delete
    connection.ensure_connection()
    print("ready", flush=True)
    sys.stdin.readline()
    return {"deleted": JobHandler.cleanup_old_jobs(), "fcntl": cleanup.HAS_FCNTL}


if __name__ == "__main__":
    if os.environ.get("WITHOUT_FCNTL"):
        sys.modules["fcntl"] = None  # type: ignore[assignment]
    django.setup()
    role = sys.argv[1]
    if role == "setup":
        print(json.dumps(setup(int(sys.argv[2]))), flush=True)
    else:
        print(json.dumps(run(sys.argv[2], float(sys.argv[3]))), flush=True)
