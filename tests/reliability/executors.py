"""Test executors: dispatch waits for commit, and jobs stay pending until a test or a worker
process (``tests.reliability.worker``) runs them."""

from __future__ import annotations

import functools
import threading

from django.db import transaction

from task_ferry.executors.base import BaseExecutor
from task_ferry.models import jobs_database


class QueueingExecutor(BaseExecutor):
    """Records job ids once the creating transaction commits, as the real executors send them;
    the worker process finds pending jobs in the database."""

    dispatched: list[int] = []
    _lock = threading.Lock()

    def enqueue(self, job_id: int) -> None:
        transaction.on_commit(functools.partial(self._record, job_id), using=jobs_database())

    def _record(self, job_id: int) -> None:
        with self._lock:
            self.dispatched.append(job_id)
