"""Runs each job inline, before ``create_and_start`` returns. For tests and scripts."""

from __future__ import annotations

from task_ferry.executors.base import BaseExecutor


class ImmediateExecutor(BaseExecutor):
    """A job's exception marks it failed, then reaches the caller of ``create_and_start``."""

    runs_out_of_process = False
    dispatches_on_commit = False

    def enqueue(self, job_id: int) -> None:
        from task_ferry.handler import JobHandler

        # Beats when the job's row is committed, so a long run is never judged lost.
        JobHandler.run_job(job_id)
