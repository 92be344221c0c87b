"""The Celery tasks of ``CeleryExecutor``. Celery's ``app.autodiscover_tasks()`` imports this
module in workers; the task names are stable, so producers need not import it.

Delivery: ``acks_late`` with ``reject_on_worker_lost``, so a message is only gone once its job
was handled, and a worker lost before the job started hands it on. A redelivered message whose
job already started (even if that run is still going) does nothing: ``JobRun`` moves a job from
pending to started with a compare-and-set, which only one delivery can win.
"""

from __future__ import annotations

from celery import shared_task

from task_ferry.executors.celery import (
    CLEANUP_OLD_JOBS_TASK,
    RUN_JOB_TASK,
    SWEEP_STALE_JOBS_TASK,
)

__all__ = ["cleanup_old_jobs", "run_job", "sweep_stale_jobs"]


@shared_task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: int, job_type_name: str | None = None) -> None:
    """Run one job. Its own exception is re-raised after the job is marked failed, so Celery
    monitoring sees it too."""
    from task_ferry.handler import JobHandler

    JobHandler.run_job(job_id, job_type_name=job_type_name)


@shared_task(name=CLEANUP_OLD_JOBS_TASK, ignore_result=True)
def cleanup_old_jobs() -> int:
    from task_ferry.handler import JobHandler

    return JobHandler.cleanup_old_jobs()


@shared_task(name=SWEEP_STALE_JOBS_TASK, ignore_result=True)
def sweep_stale_jobs() -> int:
    from task_ferry.handler import JobHandler

    return JobHandler.sweep_stale_jobs()
