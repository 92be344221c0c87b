"""The service layer: every job state change goes through here.

Views, the admin, management commands and executors call ``JobHandler``; none of them writes
job rows on its own. State changes are compare-and-set ``UPDATE``s, so each job reaches
exactly one ended state and its ending hook runs once, whoever races for it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from task_ferry import signals
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import (
    InvalidJobValues,
    JobDoesNotExist,
    MaxJobCountExceeded,
    ProgressStoreUnavailable,
)
from task_ferry.models import ENDED_STATES, Job, JobState
from task_ferry.registry import JobType, job_type_registry
from task_ferry.snapshot import cancel_token, job_snapshot
from task_ferry.stores.base import get_store

logger = logging.getLogger("task_ferry")

__all__ = ["JobHandler"]

# Columns the handler owns; prepare_values may not set them.
MANAGED_FIELDS = frozenset(f.name for f in Job._meta.get_fields() if f.concrete) | {
    "id",
    "pk",
    "job_ptr",
    "content_type_id",
    "user_id",
}
CLEANUP_BATCH_SIZE = 500


class LiveHandles:
    """The Job instances this process handed out, kept in step with the state changes the
    handler makes here. A caller holding the job from ``create_and_start`` sees it become
    cancelled or finished without a ``refresh_from_db()``."""

    PRUNE_EVERY = 1024

    def __init__(self) -> None:
        self._refs: dict[int, list[weakref.ref[Job]]] = {}
        self._lock = threading.Lock()
        self._tracked_since_prune = 0

    def track(self, job: Job) -> Job:
        with self._lock:
            self._refs.setdefault(job.pk, []).append(weakref.ref(job))
            self._tracked_since_prune += 1
            if self._tracked_since_prune >= self.PRUNE_EVERY:
                self._prune()
        return job

    def apply(self, job_id: int, fields: dict[str, Any]) -> None:
        with self._lock:
            for ref in self._refs.get(job_id, ()):
                job = ref()
                if job is not None:
                    job.apply_fields(fields)

    def _prune(self) -> None:
        self._tracked_since_prune = 0
        for job_id in list(self._refs):
            alive = [r for r in self._refs[job_id] if r() is not None]
            if alive:
                self._refs[job_id] = alive
            else:
                del self._refs[job_id]


live_handles = LiveHandles()


def transition(job: Job, to_state: JobState, *, from_states: Iterable[str], **fields: Any) -> bool:
    """Move the job to ``to_state`` if it is still in one of ``from_states``.

    Returns False when another party changed the state first; nothing is written then.
    """
    now = timezone.now()
    values: dict[str, Any] = {"state": to_state, "updated_at": now, **fields}
    if to_state == JobState.STARTED:
        values.setdefault("started_at", now)
    if to_state in ENDED_STATES:
        values.setdefault("finished_at", now)
    updated = Job.objects.filter(pk=job.pk, state__in=list(from_states)).update(**values)
    if not updated:
        return False
    job.apply_fields(values)
    live_handles.apply(job.pk, values)
    return True


def publish(job: Job) -> None:
    """Write the job's snapshot to the progress store; an unreachable store only logs."""
    try:
        get_store().write(job.pk, job_snapshot(job))
    except ProgressStoreUnavailable as exc:
        logger.warning(
            "Job %s: progress store unavailable, snapshot not published: %s", job.pk, exc
        )


def parse_job_id(job_id: Any) -> int:
    """The id as an int; anything that is not a positive integer does not exist."""
    if isinstance(job_id, bool):
        raise JobDoesNotExist(job_id)
    try:
        value = int(job_id)
    except (TypeError, ValueError, OverflowError):
        raise JobDoesNotExist(job_id) from None
    if value <= 0 or value > 2**63 - 1 or (isinstance(job_id, float) and job_id != value):
        raise JobDoesNotExist(job_id)
    return value


class JobHandler:
    """Creates, cancels, looks up and cleans up jobs. All methods are class methods."""

    @classmethod
    def create_and_start(cls, user: Any, job_type_name: str, **values: Any) -> Job:
        """Create a job of the named type for ``user`` (None for a system job) and hand it to
        the executor. Returns the saved, specific job at once."""
        job_type = job_type_registry.get(job_type_name)
        job = cls._create(user, job_type, values)
        signals.emit(signals.job_created, job)
        publish(job)
        from task_ferry.executors.base import get_executor

        get_executor().enqueue_job(job)
        return job

    @classmethod
    def _create(cls, user: Any, job_type: JobType, values: dict[str, Any]) -> Job:
        if user is not None and not getattr(user, "is_authenticated", False):
            raise InvalidJobValues("Jobs need a saved, authenticated user, or user=None.")
        try:
            prepared = job_type.prepare_values(dict(values), user)
        except ValidationError as exc:
            raise InvalidJobValues(_validation_message(exc), _validation_errors(exc)) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidJobValues(str(exc) or type(exc).__name__) from exc
        if not isinstance(prepared, dict):
            raise InvalidJobValues(
                f"{type(job_type).__name__}.prepare_values must return a dict, "
                f"got {type(prepared).__name__}."
            )
        model = job_type.model_class
        own_fields = {f.name for f in model._meta.concrete_fields} | {
            f.attname for f in model._meta.concrete_fields
        }
        unknown = sorted(k for k in prepared if k not in own_fields or k in MANAGED_FIELDS)
        if unknown:
            raise InvalidJobValues(
                f"{job_type.type!r} jobs have no field(s) {', '.join(unknown)}.",
                {name: ["Unknown field."] for name in unknown},
            )
        job = model(
            user=user,
            type=job_type.type,
            content_type=ContentType.objects.get_for_model(model),
            **prepared,
        )
        try:
            job.full_clean(
                exclude=[f.name for f in Job._meta.concrete_fields], validate_unique=False
            )
        except ValidationError as exc:
            raise InvalidJobValues(_validation_message(exc), _validation_errors(exc)) from exc

        with transaction.atomic():
            max_count = job_type.get_max_count() if user is not None else None
            if max_count is not None:
                cls._lock_user(user)
                live = Job.objects.live().filter(user_id=user.pk, type=job_type.type).count()
                if live >= max_count:
                    raise MaxJobCountExceeded(job_type.type, max_count)
            job.save(force_insert=True)
            job_type.after_job_creation(job, prepared)
        return live_handles.track(job)

    @staticmethod
    def _lock_user(user: Any) -> None:
        """Serialise job creation per user, so concurrent creates respect ``max_count``."""
        # _meta, not type(): request.user is a SimpleLazyObject under session auth.
        user._meta.model._default_manager.select_for_update().filter(pk=user.pk).values_list(
            "pk", flat=True
        ).first()

    @classmethod
    def get_job(cls, user: Any, job_id: Any) -> Job:
        """The user's job as its specific model. ``JobDoesNotExist`` for a malformed id or a
        job of someone else; ``user=None`` looks up system jobs."""
        pk = parse_job_id(job_id)
        job = Job.objects.for_user(user).filter(pk=pk).first()
        if job is None:
            raise JobDoesNotExist(job_id)
        return live_handles.track(job.specific)

    @classmethod
    def get_jobs_for_user(cls, user: Any) -> Any:
        """The user's jobs, newest first (a ``JobQuerySet``)."""
        return Job.objects.for_user(user).order_by("-created_at", "-id")

    @classmethod
    def cancel(cls, user: Any, job_id: Any) -> Job:
        """Cancel the user's job. A pending job is cancelled at once and its ``on_cancelled``
        runs here; a running job is asked to stop and stops at its next progress tick.
        Cancelling an ended job changes nothing."""
        job = cls.get_job(user, job_id)
        return cls.cancel_job(job)

    @classmethod
    def cancel_job(cls, job: Job) -> Job:
        """Cancel ``job`` without an ownership check (for staff tools and system code)."""
        if job.state == JobState.PENDING and transition(
            job, JobState.CANCELLED, from_states=[JobState.PENDING]
        ):
            cls._after_cancelled(job)
            return job
        if job.state in (JobState.PENDING, JobState.STARTED):
            from task_ferry.monitor import get_monitor

            # A job running in this process stops at its very next tick.
            get_monitor().cancel_local(job.pk)
            # Never touch the row of a running job: its transaction may hold the row lock.
            get_store().request_cancel(job.pk, token=cancel_token(job))
        return job

    @staticmethod
    def _after_cancelled(job: Job) -> None:
        publish(job)
        job_type = job_type_registry.get(job.type)
        try:
            job_type.on_cancelled(job)
        except Exception:
            logger.exception("Job %s: on_cancelled hook of %r raised", job.pk, job_type)
        signals.emit(signals.job_cancelled, job)

    @staticmethod
    def expiry_cutoff(older_than: datetime.timedelta | None = None) -> datetime.datetime:
        """Ended jobs that finished before this moment are expired."""
        if older_than is None:
            older_than = datetime.timedelta(days=ferry_settings.JOB_EXPIRY_DAYS)
        return timezone.now() - older_than

    @classmethod
    def cleanup_old_jobs(cls, *, older_than: datetime.timedelta | None = None) -> int:
        """Delete ended jobs older than ``JOB_EXPIRY_DAYS`` in batches, calling each type's
        ``before_delete`` once per job. Returns how many jobs were deleted."""
        cutoff = cls.expiry_cutoff(older_than)
        deleted = 0
        last_id = 0
        while True:
            batch = list(
                Job.objects.expired(cutoff)
                .filter(pk__gt=last_id)
                .order_by("pk")
                .values_list("pk", "type")[:CLEANUP_BATCH_SIZE]
            )
            if not batch:
                return deleted
            last_id = batch[-1][0]
            deleted += cls._delete_batch(batch, cutoff)

    @staticmethod
    def _delete_batch(batch: list[tuple[int, str]], cutoff: datetime.datetime) -> int:
        by_type: dict[str, list[int]] = {}
        for pk, type_name in batch:
            by_type.setdefault(type_name, []).append(pk)
        deleted_ids: list[int] = []
        for type_name, ids in by_type.items():
            if type_name in job_type_registry:
                job_type = job_type_registry.get(type_name)
                for job in job_type.model_class._default_manager.filter(pk__in=ids).iterator():
                    try:
                        job_type.before_delete(job)
                    except Exception:
                        logger.exception(
                            "Job %s: before_delete hook of %r raised; deleting anyway",
                            job.pk,
                            job_type,
                        )
            deleted_ids.extend(ids)
        # Re-check the cutoff so a job can never be deleted unless it is still expired.
        _, per_model = Job.objects.expired(cutoff).filter(pk__in=deleted_ids).delete()
        # An unreachable store is fine: snapshots expire on their own.
        with contextlib.suppress(ProgressStoreUnavailable):
            get_store().delete(deleted_ids)
        return per_model.get(Job._meta.label, 0)

    @classmethod
    def sweep_stale_jobs(cls) -> int:
        """Fail started jobs whose worker stopped beating, and pending jobs no worker took.

        Returns how many jobs were failed."""
        now = timezone.now()
        heartbeat_cutoff = now - datetime.timedelta(seconds=ferry_settings.HEARTBEAT_TIMEOUT)
        stale = Job.objects.running().filter(
            Q(heartbeat__beat_at__lt=heartbeat_cutoff)
            | Q(heartbeat__isnull=True, started_at__lt=heartbeat_cutoff)
        )
        failed = 0
        for job in stale.iterator():
            failed += cls._fail_lost(
                job,
                [JobState.STARTED],
                "The worker running this job stopped responding (worker lost).",
            )
        if ferry_settings.PENDING_TIMEOUT is not None:
            pending_cutoff = now - datetime.timedelta(seconds=ferry_settings.PENDING_TIMEOUT)
            for job in Job.objects.pending().filter(created_at__lt=pending_cutoff).iterator():
                failed += cls._fail_lost(
                    job,
                    [JobState.PENDING],
                    "No worker picked up this job in time. Check that workers are running.",
                )
        return failed

    @classmethod
    def fail_undispatched(cls, job_id: int, *, error: str, human_readable_error: str) -> bool:
        """Fail a pending job its executor could not hand to a queue. False if it is no longer
        pending (or was rolled back)."""
        job = Job.objects.filter(pk=job_id).first()
        if job is None:
            return False
        return bool(cls._fail_lost(job, [JobState.PENDING], error, human_readable_error))

    @staticmethod
    def _fail_lost(
        job: Job, from_states: list[JobState], message: str, human_message: str | None = None
    ) -> int:
        human_message = human_message or message
        if not transition(
            job,
            JobState.FAILED,
            from_states=from_states,
            error=message,
            human_readable_error=human_message,
        ):
            return 0
        specific = job.specific
        specific.apply_fields(
            {"state": job.state, "error": message, "human_readable_error": human_message}
        )
        publish(specific)
        job_type = job_type_registry.get(job.type)
        exc = RuntimeError(message)
        try:
            job_type.on_error(specific, exc)
        except Exception:
            logger.exception("Job %s: on_error hook of %r raised", job.pk, job_type)
        signals.emit(signals.job_failed, specific, exc=exc)
        logger.error("Job %s (%s) failed: %s", job.pk, job.type, message)
        return 1

    @staticmethod
    def run_job(
        job_id: int, *, heartbeat: bool = True, job_type_name: str | None = None
    ) -> Job | None:
        """Run a pending job in this process. Executors call this; see ``task_ferry.runner``.
        Passing the job's type name, when the executor has it, saves a query."""
        from task_ferry.runner import JobRun

        return JobRun(job_id, heartbeat=heartbeat, job_type_name=job_type_name).execute()


def _validation_errors(exc: ValidationError) -> dict[str, list[str]]:
    if hasattr(exc, "error_dict"):
        return {
            field: [str(m) for e in errs for m in e.messages]
            for field, errs in exc.error_dict.items()
        }
    return {"non_field_errors": [str(m) for m in exc.messages]}


def _validation_message(exc: ValidationError) -> str:
    parts = [f"{field}: {' '.join(msgs)}" for field, msgs in _validation_errors(exc).items()]
    return "Invalid job values. " + "; ".join(parts)
