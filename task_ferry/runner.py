"""One run of one job, from pending to an ended state. Executors call
``JobHandler.run_job(job_id)``, which builds a ``JobRun``.

The job's ``run()`` executes inside one database transaction, so a failed or cancelled job
leaves none of its own writes behind. The move to ``finished`` is the last statement of that
transaction (the work and its success commit together, or neither does); the moves to
``started``, ``failed`` and ``cancelled`` are committed on their own, so they are never rolled
back.
"""

from __future__ import annotations

import logging
import traceback

from django.db import connection, transaction

from task_ferry import signals
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import JobCancelled, JobFenced
from task_ferry.handler import JobHandler, publish, transition
from task_ferry.models import Job, JobState
from task_ferry.monitor import JobMonitor
from task_ferry.progress import Progress
from task_ferry.registry import JobType, job_type_registry
from task_ferry.stores.base import get_store

logger = logging.getLogger("task_ferry")

# Shown to users when a job fails with an error of its own code.
GENERIC_FAILURE = "Something went wrong while running this job."


def reconnect_if_broken() -> None:
    """A dropped database connection must not stop us from recording how the job ended."""
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()


class JobRun:
    def __init__(self, job_id: int, *, heartbeat: bool = True) -> None:
        self.job_id = job_id
        self.heartbeat = heartbeat

    def execute(self) -> Job | None:
        """Run the job if it is still pending. Returns the job, or None if it was not run.

        Re-raises the job's own exception after the job is marked failed.
        """
        job = Job(pk=self.job_id)
        if not transition(job, JobState.STARTED, from_states=[JobState.PENDING]):
            # Cancelled before it started, or already taken by another delivery.
            logger.info("Job %s is not pending; not running it.", self.job_id)
            return None
        job = Job.objects.get(pk=self.job_id).specific
        job_type = job_type_registry.get(job.type)
        publish(job)
        signals.emit(signals.job_started, job)
        progress = Progress()
        monitor = JobMonitor(
            job,
            progress,
            get_store(),
            publish_interval=ferry_settings.PUBLISH_INTERVAL,
            heartbeat_interval=ferry_settings.HEARTBEAT_INTERVAL if self.heartbeat else None,
        )
        monitor.start()
        try:
            with transaction.atomic():
                job_type.run(job, progress)
                _percentage, label = monitor.stop()
                if not transition(
                    job,
                    JobState.FINISHED,
                    from_states=[JobState.STARTED],
                    progress_percentage=100,
                    progress_state=label,
                ):
                    raise JobFenced(f"Job {job.pk} was ended elsewhere while it ran.")
        except JobCancelled:
            self._end_cancelled(job, job_type, monitor)
            return job
        except JobFenced:
            logger.warning(
                "Job %s was ended elsewhere while it ran; its work was rolled back.", job.pk
            )
            return job
        except Exception as exc:
            self._end_failed(job, job_type, monitor, exc)
            raise
        publish(job)
        signals.emit(signals.job_finished, job)
        return job

    def _end_cancelled(self, job: Job, job_type: JobType, monitor: JobMonitor) -> None:
        percentage, label = monitor.stop()
        reconnect_if_broken()
        if not transition(
            job,
            JobState.CANCELLED,
            from_states=[JobState.STARTED],
            progress_percentage=percentage,
            progress_state=label,
        ):
            return
        JobHandler._after_cancelled(job)

    def _end_failed(
        self, job: Job, job_type: JobType, monitor: JobMonitor, exc: BaseException
    ) -> None:
        percentage, label = monitor.stop()
        reconnect_if_broken()
        error = f"{type(exc).__name__}: {exc}"
        human = getattr(exc, "human_readable_error", None) or GENERIC_FAILURE
        if not transition(
            job,
            JobState.FAILED,
            from_states=[JobState.STARTED],
            progress_percentage=percentage,
            progress_state=label,
            error=error[:2000],
            human_readable_error=str(human),
            traceback="".join(traceback.format_exception(exc)),
        ):
            return
        publish(job)
        logger.error("Job %s (%s) failed: %s", job.pk, job.type, error, exc_info=exc)
        try:
            job_type.on_error(job, exc)
        except Exception:
            logger.exception("Job %s: on_error hook of %r raised", job.pk, job_type)
        signals.emit(signals.job_failed, job, exc=exc)
