"""A minimal out-of-process worker for the reliability tests. It polls the database for pending
jobs and runs each through ``JobHandler.run_job``, as a Celery or db_worker task does, and keeps
going when a job raises.

    python -m tests.reliability.worker run             # the worker loop
    python -m tests.reliability.worker run-no-heartbeat  # the same, run_job(heartbeat=False)
    python -m tests.reliability.worker manage ARGS...  # a management command

``TF_WORKER_SETTINGS`` (JSON) is merged over the test settings' ``TASK_FERRY``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    overrides = json.loads(os.environ.get("TF_WORKER_SETTINGS", "{}"))
    settings.TASK_FERRY = {**settings.TASK_FERRY, **overrides}
    import django

    django.setup()
    from task_ferry.registry import job_type_registry
    from tests.reliability import job_types

    job_type_registry.register_module(job_types)


def run(*, heartbeat: bool = True) -> None:
    from django.db import DatabaseError, connection

    from task_ferry.handler import JobHandler
    from task_ferry.models import Job

    print(f"ready {os.getpid()}", flush=True)
    while True:
        try:
            job_id = Job.objects.pending().order_by("pk").values_list("pk", flat=True).first()
        except DatabaseError as exc:
            print(f"poll-error {exc!r}", flush=True)
            connection.close()
            time.sleep(0.1)
            continue
        if job_id is None:
            time.sleep(0.05)
            continue
        print(f"start {job_id}", flush=True)
        try:
            JobHandler.run_job(job_id, heartbeat=heartbeat)
        except Exception as exc:
            print(f"raised {job_id} {type(exc).__name__}", flush=True)
        else:
            print(f"ran {job_id}", flush=True)


def main(argv: list[str]) -> None:
    setup()
    if argv[:1] == ["run"]:
        run()
    elif argv[:1] == ["run-no-heartbeat"]:
        run(heartbeat=False)
    elif argv[:1] == ["manage"]:
        from django.core.management import execute_from_command_line

        execute_from_command_line(["manage.py", *argv[1:]])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
