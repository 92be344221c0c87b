"""The stale-job sweep (``JobHandler.sweep_stale_jobs()``): started jobs whose worker
stopped beating, and pending jobs no worker took within ``PENDING_TIMEOUT``, failed with their
``on_error`` hooks run; final snapshots that a store outage kept from being written, written
again. Safe to run from several places at once: every state change is a compare-and-set.
The same failing serves a run that Celery killed at its hard time limit
(``fail_killed_at_time_limit()``, called by the worker as soon as the kill happens).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models import Exists, OuterRef, Q

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import JobLost, JobTimeLimitExceeded, TaskFerryError
from task_ferry.handler import StoreRound, announce_lost, moment_ago, transition
from task_ferry.models import LIVE_STATES, Heartbeat, Job, JobQuerySet, JobState, jobs_database
from task_ferry.snapshot import snapshot_of, truncate_state
from task_ferry.transactions import lock_for_writing

__all__ = ["fail_killed_at_time_limit", "lost_jobs", "sweep_stale_jobs", "unclaimed_jobs"]

logger = logging.getLogger("task_ferry")

# Jobs failed, and snapshots read, per batch.
SWEEP_BATCH_SIZE = 500


def sweep_stale_jobs() -> int:
    """Fail started jobs whose heartbeat lapsed (their worker is gone) and pending jobs no
    worker took within ``PENDING_TIMEOUT``. Safe to run from several places at once.

    Returns how many jobs were failed."""
    timeout = ferry_settings.HEARTBEAT_TIMEOUT
    store = StoreRound(
        lost_warning="Sweep: progress store unavailable, no more snapshots read or published "
        "this round; a later round publishes those of the jobs it fails: %s"
    )
    worker_lost = (
        f"The worker running this job stopped responding for over {timeout:g} seconds "
        f"(worker lost). Start the job again."
    )
    failed = _fail_each(
        lost_jobs(datetime.timedelta(seconds=timeout)),
        JobState.STARTED,
        lambda job: (worker_lost, worker_lost),
        store,
    )
    pending_timeout = ferry_settings.PENDING_TIMEOUT
    if pending_timeout is not None:
        failed += _fail_each(
            unclaimed_jobs(datetime.timedelta(seconds=pending_timeout)),
            JobState.PENDING,
            NeverPickedUp(pending_timeout).errors,
            store,
        )
    _republish_ended(
        moment_ago(datetime.timedelta(seconds=ferry_settings.PROGRESS_CACHE_TIMEOUT)), store
    )
    return failed


def fail_killed_at_time_limit(job_id: int, killed_after: float) -> bool:
    """Fail a started job whose run a hard time limit killed with its worker process after
    ``killed_after`` seconds (Celery's, see ``task_ferry.tasks.RunJobRequest``): at once,
    rather than once its heartbeat lapses. ``on_error`` gets a ``JobTimeLimitExceeded`` with
    the type's ``time_limit`` (for a type without one, the hard limit's seconds). Returns
    whether this failed it (False: it had ended, or it never started)."""
    from task_ferry.registry import job_type_registry

    def stopped_by(job: Job, _error: str = "") -> JobTimeLimitExceeded:
        job_type = job_type_registry.get(job.type) if job.type in job_type_registry else None
        time_limit = None if job_type is None else job_type.time_limit
        return JobTimeLimitExceeded(killed_after if time_limit is None else time_limit)

    def errors(job: Job) -> tuple[str, str]:
        # As the run's own end would say it: the killed process may have got there first.
        exc = stopped_by(job)
        return f"{type(exc).__name__}: {exc}", exc.human_readable_error

    store = StoreRound(lost_warning="Progress store unavailable, the final snapshot waits: %s")
    running = Job.objects.running().filter(pk=job_id)
    return _fail_each(running, JobState.STARTED, errors, store, stopped_by=stopped_by) == 1


def lost_jobs(silent_for: datetime.timedelta) -> JobQuerySet[Job]:
    """Started jobs whose last heartbeat is older than ``silent_for``, or which never beat and
    started before that: their worker is gone."""
    cutoff = moment_ago(silent_for)
    # A job beats within HEARTBEAT_INTERVAL of its start; one with no beat yet that started
    # before the cutoff died early (short jobs never need to beat).
    lapsed = Exists(Heartbeat.objects.filter(job_id=OuterRef("pk"), beat_at__lt=cutoff)) | (
        ~Exists(Heartbeat.objects.filter(job_id=OuterRef("pk"))) & Q(started_at__lt=cutoff)
    )
    return Job.objects.running().filter(lapsed)


def unclaimed_jobs(waiting_for: datetime.timedelta) -> JobQuerySet[Job]:
    """Pending jobs created more than ``waiting_for`` ago: no worker took them."""
    return Job.objects.pending().filter(created_at__lt=moment_ago(waiting_for))


def _republish_ended(since: datetime.datetime, store: StoreRound) -> None:
    """Rewrite snapshots that still show a job as live after it ended: its final publish
    failed while the store was unreachable (or the sweep round that failed it had found the
    store so), and pollers would wait until the key expired."""
    ended = Job.objects.ended().filter(finished_at__gte=since).order_by("pk")
    last_id = 0
    while not store.unavailable:
        ids = list(ended.filter(pk__gt=last_id).values_list("pk", flat=True)[:SWEEP_BATCH_SIZE])
        if not ids:
            return
        last_id = ids[-1]
        snapshots = store.read_many(ids)
        stale = [pk for pk, snapshot in snapshots.items() if snapshot.get("state") in LIVE_STATES]
        for job in Job.objects.filter(pk__in=stale):
            logger.info("Job %s: republishing its final state to the progress store.", job.pk)
            store.publish(job)


class NeverPickedUp:
    """The errors of a pending job that no worker took within ``PENDING_TIMEOUT``. The
    operators' names the queue its type's jobs wait in, and how a worker takes it: a worker
    started on other queues is the usual cause. Users get no commands. Built once per type and
    sweep, from the registry and the settings: no query."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.for_users = (
            f"No worker picked up this job within {timeout:g} seconds, so it never started. "
            f"Try again later."
        )
        self._by_type: dict[str, tuple[str, str]] = {}

    def errors(self, job: Job) -> tuple[str, str]:
        """``error`` and ``human_readable_error`` for ``job``."""
        if job.type not in self._by_type:
            self._by_type[job.type] = (self._for_operators(job.type), self.for_users)
        return self._by_type[job.type]

    def _for_operators(self, type_name: str) -> str:
        from task_ferry.executors.base import get_executor

        try:
            queue = get_executor().waiting_queue(type_name)
        except Exception:
            # A type no longer registered, an executor that cannot be loaded: the job still fails.
            logger.debug("Sweep: no queue to name for job type %r", type_name, exc_info=True)
            queue = None
        if queue is None:
            return (
                f"No worker picked up this job within {self.timeout:g} seconds. Check that "
                f"workers are running and consume this job's queue, then start it again."
            )
        command = f" ({queue.worker_command})" if queue.worker_command else ""
        return (
            f"No worker picked up this job within {self.timeout:g} seconds from {queue.name}. "
            f"Check that workers are running and consume that queue{command}, then start it "
            f"again."
        )


def _fail_each(
    candidates: JobQuerySet[Job],
    from_state: JobState,
    errors: Callable[[Job], tuple[str, str]],
    store: StoreRound,
    stopped_by: Callable[[Job, str], TaskFerryError] = lambda _job, error: JobLost(error),
) -> int:
    """Fail each of the candidates still in ``from_state``, with ``errors(job)`` (``error``,
    ``human_readable_error``); ``on_error`` gets ``stopped_by(job, error)``."""
    failed = 0
    ids = list(candidates.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(ids), SWEEP_BATCH_SIZE):
        batch = ids[start : start + SWEEP_BATCH_SIZE]
        # Read before any row is locked: a store that hangs would hold each lock for its
        # timeout. Matched to each job by created_at once its row is locked.
        published = store.read_many(batch) if from_state == JobState.STARTED else {}
        for pk in batch:
            with transaction.atomic(using=jobs_database()):
                lock_for_writing(jobs_database())
                # A row locked by a live transaction (a frozen worker's) is retried next
                # sweep rather than blocking this one.
                job = candidates.select_for_update(skip_locked=True).filter(pk=pk).first()
                if job is None:
                    continue
                error, for_users = errors(job)
                if not transition(
                    job,
                    JobState.FAILED,
                    from_states=[from_state],
                    error=error,
                    human_readable_error=for_users,
                    **last_progress(job, published.get(pk)),
                ):
                    continue
            announce_lost(job, stopped_by(job, error), publish_final=store.publish)
            failed += 1
    return failed


def last_progress(job: Job, snapshot: dict[str, Any] | None) -> dict[str, Any]:
    """The progress a running job last published (``snapshot``, read from the store), as the
    fields of its row (the row keeps what the job had when it started until it ends); empty if
    the snapshot is not this job's live one."""
    if (
        not snapshot
        or snapshot.get("state") != JobState.STARTED
        or snapshot_of(job, snapshot) is None
    ):
        return {}
    percentage, label = snapshot.get("progress_percentage"), snapshot.get("progress_state")
    fields: dict[str, Any] = {}
    if isinstance(percentage, int) and not isinstance(percentage, bool) and 0 <= percentage <= 100:
        fields["progress_percentage"] = percentage
    if isinstance(label, str):
        fields["progress_state"] = truncate_state(label)
    return fields
