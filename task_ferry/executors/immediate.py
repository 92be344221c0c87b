"""Runs each job inline, before ``create_and_start`` returns. For tests and scripts."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from task_ferry.executors.base import BaseExecutor

if TYPE_CHECKING:
    from task_ferry.models import Job


class ImmediateExecutor(BaseExecutor):
    """A job's exception marks it failed, then reaches the caller of ``create_and_start``.
    The job the caller gets back shows its row as the run left it, its own fields included."""

    runs_out_of_process = False
    dispatches_on_commit = False

    def enqueue(self, job_id: int) -> None:
        from task_ferry.handler import JobHandler

        # Beats when the job's row is committed, so a long run is never judged lost.
        JobHandler.run_job(job_id)

    def enqueue_job(self, job: Job) -> None:
        from django.core.exceptions import ObjectDoesNotExist

        from task_ferry.models import JobState, jobs_database

        self.enqueue(job.pk)
        if job.state == JobState.PENDING:
            return  # Not run (an enqueue() patched out by a test): the job is as created.
        # The run worked on an instance of its own: the handler kept this one's state in step,
        # not the fields run() saved. Deleted while it ran: the state it has is all there is.
        with contextlib.suppress(ObjectDoesNotExist):
            job.refresh_from_db(using=jobs_database())
