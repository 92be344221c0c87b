"""The Celery tasks of ``CeleryExecutor``. Celery's ``app.autodiscover_tasks()`` imports this
module in workers; the task names are stable, so producers need not import it.

Delivery: ``acks_late`` with ``reject_on_worker_lost``, so a message is only gone once its job
was handled, and a worker lost before the job started hands it on. A redelivered message whose
job already started (even if that run is still going) does nothing: ``JobRun`` moves a job from
pending to started with a compare-and-set, which only one delivery can win.

Hard time limits: a run that Celery kills at its hard time limit (a type's ``time_limit`` plus
``CELERY_TIME_LIMIT_GRACE``, or the app's ``task_time_limit``) has its job failed at once by
``RunJobRequest``, in the worker's main process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_ready
from celery.worker import state as worker_state
from celery.worker.request import Request

from task_ferry.executors.celery import (
    CLEANUP_OLD_JOBS_TASK,
    RUN_JOB_TASK,
    SWEEP_STALE_JOBS_TASK,
    log_queues_served,
    log_worker_checks,
)

__all__ = ["cleanup_old_jobs", "run_job", "sweep_stale_jobs"]

logger = logging.getLogger("task_ferry")

DATABASE_RETRIES = 3
DATABASE_RETRY_DELAY = 1


class RunJobRequest(Request):
    """A ``run_job`` message as the worker's main process handles it. When the pool kills the
    run at its hard time limit, the job is failed at once (the message is acknowledged, and
    the killed run left no heartbeat to lapse for a minute first). In a thread: the main
    process consumes messages and must not wait on the database or ``on_error``."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        # A cold shutdown ends runs through this too: those are no time limit's.
        terminating = getattr(worker_state, "should_terminate", None)
        if soft or (terminating is not None and terminating is not False):
            return
        job_id = self.args[0] if self.args else None
        if not isinstance(job_id, int):
            return
        threading.Thread(
            target=fail_killed_run,
            args=(job_id, timeout),
            name=f"task_ferry-killed-job-{job_id}",
            daemon=True,
        ).start()


class RunJobTask(Task[Any, Any]):
    """The class of ``run_job``: its messages are ``RunJobRequest``s."""

    Request = "task_ferry.tasks:RunJobRequest"


def fail_killed_run(job_id: int, killed_after: float) -> None:
    """Fail the job whose run the pool killed after ``killed_after`` seconds. A failure here
    leaves the job to the stale-job sweep."""
    from django.db import connections

    from task_ferry.sweep import fail_killed_at_time_limit

    try:
        fail_killed_at_time_limit(job_id, killed_after)
    except Exception:
        logger.exception(
            "Job %s: its run was killed at its hard time limit, and it could not be marked "
            "failed; the stale-job sweep fails it once its heartbeat lapses.",
            job_id,
        )
    finally:
        connections.close_all()


@shared_task(
    name=RUN_JOB_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=DATABASE_RETRIES,
    base=RunJobTask,
)
def run_job(self: RunJobTask, job_id: int, job_type_name: str | None = None) -> None:
    """Run one job. Its own exception is re-raised after the job is marked failed, so Celery
    monitoring sees it too."""
    from task_ferry.exceptions import InvalidJobId
    from task_ferry.handler import JobHandler

    try:
        with retried_on_lost_connection(self):
            # A job that had started is not run again by the retry: the compare-and-set decides.
            ran = JobHandler.run_job(job_id, job_type_name=job_type_name)
            if ran is None and (self.request.delivery_info or {}).get("redelivered"):
                warn_if_redelivered_while_started(job_id)
    except InvalidJobId as exc:
        # No delivery of this message can succeed: rejected without requeue, it is never
        # redelivered (on RabbitMQ it goes to the queue's dead-letter exchange, if any).
        logger.error("Rejected a %s message: %s", RUN_JOB_TASK, exc)
        raise Reject(exc, requeue=False) from exc


def warn_if_redelivered_while_started(job_id: int) -> None:
    """Say so when a redelivered message finds its job started: most often the worker that
    took it first was killed mid-run (a deploy's stop timeout, the OOM killer), which
    Celery's own log line does not tie to the job. One query, on redeliveries only."""
    from task_ferry.conf import ferry_settings
    from task_ferry.models import Job, JobState, jobs_database

    state = Job.objects.using(jobs_database()).filter(pk=job_id).values_list("state", flat=True)
    if state.first() != JobState.STARTED:
        return
    logger.warning(
        "Job %s was delivered again while started: the worker that took it first died or lost "
        "its broker connection mid-run (or the run outlasted the broker's visibility timeout "
        "or consumer_timeout). Not running it twice. If that worker is gone, the stale-job "
        "sweep fails the job %gs after its last heartbeat (HEARTBEAT_TIMEOUT); check that "
        "celery beat or task_ferry_sweep runs.",
        job_id,
        ferry_settings.HEARTBEAT_TIMEOUT,
    )


@contextlib.contextmanager
def retried_on_lost_connection(task: Task[Any, Any]) -> Iterator[None]:
    """Retry ``task`` on a new connection if the database connection turns out to be dead.

    A connection kept across tasks (``CELERY_DB_REUSE_MAX``) dies with a database restart, and
    Celery closes it again only after ``2 * CELERY_DB_REUSE_MAX`` tasks: every task of that
    worker process would fail until then."""
    from django.db import InterfaceError, OperationalError, connections

    try:
        yield
    except (InterfaceError, OperationalError) as exc:
        connections.close_all()
        raise task.retry(exc=exc, countdown=DATABASE_RETRY_DELAY) from exc


# Workers import this module (autodiscover_tasks) before they start consuming. Celery calls
# receivers in the order they connect: the checks' findings come first.
@worker_ready.connect(dispatch_uid="task_ferry.log_worker_checks")
def log_worker_checks_at_start(sender: Any, **kwargs: Any) -> None:
    log_worker_checks()


@worker_ready.connect(dispatch_uid="task_ferry.log_queues_served")
def log_queues_served_at_start(sender: Any, **kwargs: Any) -> None:
    log_queues_served(sender)


@shared_task(
    name=CLEANUP_OLD_JOBS_TASK, bind=True, ignore_result=True, max_retries=DATABASE_RETRIES
)
def cleanup_old_jobs(self: Task[Any, Any]) -> int:
    from task_ferry.handler import JobHandler

    with retried_on_lost_connection(self):
        return JobHandler.cleanup_old_jobs()


@shared_task(
    name=SWEEP_STALE_JOBS_TASK, bind=True, ignore_result=True, max_retries=DATABASE_RETRIES
)
def sweep_stale_jobs(self: Task[Any, Any]) -> int:
    from task_ferry.handler import JobHandler

    with retried_on_lost_connection(self):
        return JobHandler.sweep_stale_jobs()
