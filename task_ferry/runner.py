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
import uuid

from django.db import DatabaseError, connection, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from task_ferry import signals
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import JobCancelled, JobFenced
from task_ferry.handler import JobHandler, publish, transition
from task_ferry.models import Heartbeat, Job, JobState
from task_ferry.monitor import WORKER_NAME, JobMonitor
from task_ferry.progress import Progress
from task_ferry.registry import JobType, job_type_registry
from task_ferry.stores.base import get_store

logger = logging.getLogger("task_ferry")

# Shown to users when a job fails with an error of its own code.
GENERIC_FAILURE = "Something went wrong while running this job."
# Shown when the job's database connection broke (server restart, killed backend, network).
DATABASE_FAILURE = "The database connection was lost while running this job. Start it again."


class JobRun:
    def __init__(self, job_id: int, *, heartbeat: bool = True) -> None:
        self.job_id = job_id
        self.heartbeat = heartbeat

    def execute(self) -> Job | None:
        """Run the job if it is still pending. Returns the job, or None if it was not run.

        Re-raises the job's own exception after the job is marked failed.
        """
        job = Job(pk=self.job_id)
        # Inside a transaction nobody else sees the job's row, so no sweep can judge it lost.
        beating = self.heartbeat and not connection.in_atomic_block
        run_token = f"{WORKER_NAME}:{uuid.uuid4().hex[:12]}"
        with transaction.atomic():
            if not transition(job, JobState.STARTED, from_states=[JobState.PENDING]):
                # Cancelled before it started, or already taken by another delivery.
                logger.info("Job %s is not pending; not running it.", self.job_id)
                return None
            if beating:
                # Committed with the start, so a worker dying right after is still detected.
                Heartbeat.objects.update_or_create(
                    job_id=self.job_id, defaults={"worker": run_token, "beat_at": timezone.now()}
                )
        job = Job.objects.get(pk=self.job_id).specific
        job_type = job_type_registry.get(job.type)
        publish(job)
        signals.job_started.send(sender=type(job), job=job)
        progress = Progress()
        monitor = JobMonitor(
            job,
            progress,
            get_store(),
            publish_interval=ferry_settings.PUBLISH_INTERVAL,
            heartbeat_interval=ferry_settings.HEARTBEAT_INTERVAL if beating else None,
            run_token=run_token,
        )
        monitor.start()
        # The sweep deletes the heartbeat when it fails the job; without it this run is a zombie,
        # even if the job's own code saved the row back to "started".
        still_ours = Exists(Heartbeat.objects.filter(job_id=OuterRef("pk"), worker=run_token))
        db_connection = connection.connection
        try:
            with transaction.atomic():
                job_type.run(job, progress)
                _percentage, label = monitor.stop()
                if not transition(
                    job,
                    JobState.FINISHED,
                    from_states=[JobState.STARTED],
                    where=still_ours if beating else None,
                    progress_percentage=100,
                    progress_state=label,
                ):
                    raise JobFenced(f"Job {job.pk} was ended elsewhere while it ran.")
        except JobCancelled:
            if monitor.fenced:
                return self._fenced(job)
            self._end_cancelled(job, job_type, monitor)
            return job
        except JobFenced:
            return self._fenced(job)
        except Exception as exc:
            # Django replaces the connection when rolling back on it failed: it broke.
            connection_lost = (
                isinstance(exc, DatabaseError) and connection.connection is not db_connection
            )
            self._end_failed(job, job_type, monitor, exc, connection_lost=connection_lost)
            raise
        publish(job)
        signals.job_finished.send(sender=type(job), job=job)
        return job

    @staticmethod
    def _fenced(job: Job) -> Job:
        logger.warning("Job %s was ended elsewhere while it ran; its work was rolled back.", job.pk)
        job.refresh_from_db(fields=["state", "error", "human_readable_error", "finished_at"])
        return job

    def _end_cancelled(self, job: Job, job_type: JobType, monitor: JobMonitor) -> None:
        percentage, label = monitor.stop()
        connection.close_if_unusable_or_obsolete()
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
        self,
        job: Job,
        job_type: JobType,
        monitor: JobMonitor,
        exc: BaseException,
        *,
        connection_lost: bool = False,
    ) -> None:
        percentage, label = monitor.stop()
        # A dropped database connection must not stop us from recording the failure.
        connection.close_if_unusable_or_obsolete()
        error = f"{type(exc).__name__}: {exc}"
        human = getattr(exc, "human_readable_error", None) or (
            DATABASE_FAILURE if connection_lost else GENERIC_FAILURE
        )
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
        signals.job_failed.send(sender=type(job), job=job, exc=exc)
