"""The service layer: every job state change goes through here.

Views, the admin, management commands and executors call ``JobHandler``; none of them writes
job rows on its own. State changes are compare-and-set ``UPDATE``s, so each job reaches
exactly one ended state and its ending hook runs once, whoever races for it. Its larger
parts have modules of their own, which it calls: ``task_ferry.creation`` checks a new job's
values and saves it, ``task_ferry.runner`` runs one, ``task_ferry.cleanup`` deletes old jobs
and ``task_ferry.sweep`` fails those whose worker is gone.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, overload

from asgiref.sync import sync_to_async
from django.core.exceptions import ObjectDoesNotExist
from django.db import IntegrityError, transaction
from django.db.models import Model
from django.db.models.signals import post_delete
from django.utils import timezone

from task_ferry import creation, signals, statements
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import (
    DispatchError,
    InvalidJobId,
    InvalidJobValues,
    JobDoesNotExist,
    ProgressStoreUnavailable,
    SnapshotsNotForgotten,
    TaskFerryError,
)
from task_ferry.models import (
    ENDED_STATES,
    CancelRequest,
    Job,
    JobQuerySet,
    JobState,
    jobs_database,
)
from task_ferry.monitor import forget_heartbeats
from task_ferry.registry import JobModelT, JobType, job_type_registry
from task_ferry.snapshot import (
    cancel_token,
    job_snapshot,
    truncate_error,
)
from task_ferry.stores.base import get_store
from task_ferry.transactions import after_commit, call_on_commit, pending_call

logger = logging.getLogger("task_ferry")

__all__ = ["JobHandler"]

ERROR_FIELDS = frozenset({"error", "human_readable_error"})
# The columns of the Job row, which task_ferry writes: its key left out.
BASE_FIELDS = [f.attname for f in Job._meta.concrete_fields if not f.primary_key]


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


def transition(
    job: Job,
    to_state: JobState,
    *,
    from_states: Iterable[str],
    flush: bool = True,
    **fields: Any,
) -> bool:
    """Move the job to ``to_state`` if it is still in one of ``from_states``.

    Returns False when another party changed the state first; nothing is written then.

    ``flush=False``: on PostgreSQL in autocommit mode, the commit returns before the WAL is
    flushed to disk (one fsync less, no extra round trip). The runner uses it for the moves to
    ``started`` and ``cancelled``, which carry none of the job's work: a database crash that
    loses the ``started`` leaves a pending job none of whose work committed (that commit would
    have flushed the ``started`` with it), and one that loses the ``cancelled`` leaves a
    started job that the stale-job sweep ends. Inside a caller's transaction the caller's
    commit decides.
    """
    now = timezone.now()
    values: dict[str, Any] = {"state": to_state, "updated_at": now, **fields}
    # Texts taken from exceptions (the job's, a broker's): one the database refuses would leave
    # the job in its state.
    for name in ERROR_FIELDS.intersection(fields):
        values[name] = truncate_error(str(values[name]))
    if to_state == JobState.STARTED:
        values.setdefault("started_at", now)
    if to_state in ENDED_STATES:
        values.setdefault("finished_at", now)
    if not statements.compare_and_set(job.pk, list(from_states), values, flush=flush):
        return False
    job.apply_fields(values)
    live_handles.apply(job.pk, values)
    return True


def start_and_load(job_id: int, type_name: str, model: type[Job]) -> Job | None:
    """``statements.start_and_load``, keeping the handles of the job in step."""
    job = statements.start_and_load(job_id, type_name, model)
    if job is not None:
        live_handles.apply(
            job.pk,
            {"state": job.state, "updated_at": job.updated_at, "started_at": job.started_at},
        )
    return job


def publish(job: Job) -> None:
    """Write the job's snapshot to the progress store and announce it to listeners; an
    unreachable store only logs."""
    try:
        get_store().write(job.pk, job_snapshot(job))
    except ProgressStoreUnavailable as exc:
        # Only ended jobs are published here (the monitor publishes running ones).
        logger.warning(
            "Job %s: progress store unavailable, its end not published. Polls answer from the "
            "job's row meanwhile; where the store kept a live snapshot of the job, the first "
            "stale-job sweep after the store is back writes its end. %s",
            job.pk,
            exc,
        )


def publish_as_stored(job: Job) -> bool:
    """``publish()`` the job as its row stands: a run that failed or was stopped may have
    changed the instance with writes that were rolled back. A job whose row was deleted
    meanwhile is forgotten by the store instead, so that polls find it gone. Returns whether
    the row is there."""
    # The base manager: a default manager that filters rows must not make the job look deleted.
    stored = type(job)._base_manager.using(jobs_database()).filter(pk=job.pk).first()
    if stored is None:
        forget_snapshots([job.pk])
        forget_heartbeats([job.pk])
        return False
    publish(stored)
    return True


def forget_deleted_job(sender: Any, instance: Job, using: str, **kwargs: Any) -> None:
    """``post_delete`` receiver: once the delete commits, the store forgets the job, so polls
    and streams, answered from the store, find it gone. One store call per transaction (and
    per savepoint that deletes jobs), each job once: a delete through a proxy of ``Job`` that
    cascades to the job's own model sends the signal for the proxy and for ``Job``."""
    # The same savepoint's: a rollback to a savepoint drops its callbacks, not the ids added to
    # an outer one's.
    pending = pending_call(forget_snapshots, using, same_savepoint=True)
    if pending is not None:
        pending.args[0].add(instance.pk)
        return
    call_on_commit(functools.partial(forget_snapshots, {instance.pk}), using, same_savepoint=True)


def forget_deletes_of(model: type[Model]) -> None:
    """Connect ``forget_deleted_job`` to the deletes of ``model`` if it is ``Job`` or a proxy of
    it: Django sends ``post_delete`` with the model the delete went through. Not to a job
    type's model or a proxy of one: their deletes send it for the ``Job`` part of each job too,
    and the job would be forgotten twice."""
    if model._meta.concrete_model is Job:
        post_delete.connect(forget_deleted_job, sender=model, dispatch_uid="task_ferry.forget")


def forget_deletes_of_new_model(sender: type[Model], **kwargs: Any) -> None:
    """``class_prepared`` receiver, for a proxy of ``Job`` defined once the apps are ready (in a
    ``job_types.py`` module, say)."""
    forget_deletes_of(sender)


def job_row_exists(job_id: int) -> bool:
    """Whether the job's row is there, read where jobs are written: a replica may not have seen
    its delete yet."""
    return Job._base_manager.using(jobs_database()).filter(pk=job_id).exists()


class StoreRound:
    """The progress store as one maintenance run calls it: a ``cleanup_old_jobs`` run, or a
    round of the stale-job sweep. After the first call that fails, the run calls it no more:
    against a store that hangs, each call would wait out the socket timeout again (the cleanup,
    once per batch of 500 deleted jobs; the sweep, with the jobs still to fail waiting). What
    it skips is counted. Snapshots left unforgotten expire after ``PROGRESS_CACHE_TIMEOUT``;
    final snapshots left unwritten are rewritten by a later sweep round (``_republish_ended``)."""

    def __init__(self, *, lost_warning: str | None = None) -> None:
        #: Logged with the store's error when its first call fails; a failed ``forget`` also
        #: says how many snapshots it left, whatever this is.
        self.lost_warning = lost_warning
        self.unavailable = False
        #: Snapshots the run did not read, write or forget because the store had failed.
        self.skipped = 0

    def read_many(self, job_ids: list[int]) -> dict[int, dict[str, Any]]:
        """The snapshots the store holds of these jobs, in one read; empty if it cannot be
        reached."""
        if self._skip(len(job_ids)):
            return {}
        try:
            return get_store().read_many(job_ids)
        except ProgressStoreUnavailable as exc:
            self._lost(exc)
            return {}

    def publish(self, job: Job) -> None:
        if self._skip(1):
            return
        try:
            get_store().write(job.pk, job_snapshot(job))
        except ProgressStoreUnavailable as exc:
            self._lost(exc)

    def forget(self, job_ids: Collection[int]) -> None:
        if self._skip(len(job_ids)):
            return
        try:
            get_store().delete(job_ids)
        except ProgressStoreUnavailable as exc:
            self._lost(exc)
            # A store that deletes in batches forgot those before the one that failed.
            not_forgotten = exc.job_ids if isinstance(exc, SnapshotsNotForgotten) else job_ids
            # They expire on their own. Counts: a bulk delete can be of many thousands.
            logger.warning(
                "Progress store unavailable, snapshots of %d of %d deleted jobs not forgotten: %s",
                len(not_forgotten),
                len(job_ids),
                exc,
            )

    def _skip(self, count: int) -> bool:
        if self.unavailable:
            self.skipped += count
        return self.unavailable

    def _lost(self, exc: ProgressStoreUnavailable) -> None:
        self.unavailable = True
        if self.lost_warning is not None:
            logger.warning(self.lost_warning, exc)


# The round of the cleanup running in this context, for the post_delete receiver's calls.
cleanup_round: contextvars.ContextVar[StoreRound | None] = contextvars.ContextVar(
    "task_ferry_cleanup_round", default=None
)


def forget_snapshots(job_ids: Collection[int]) -> None:
    """Have the store forget these jobs' snapshots; an unreachable store only logs. During a
    ``cleanup_old_jobs`` run, through its round."""
    cleanup = cleanup_round.get()
    (StoreRound() if cleanup is None else cleanup).forget(job_ids)


def own_row_missing(job: Job, job_type: JobType) -> str | None:
    """Why ``job`` is not an instance of its type's model, or None if it is: its row in that
    model's table is missing (``Job.specific`` then gives the plain ``Job``), or the type's
    model changed since the job was created."""
    model = job_type.model_class
    # A proxy's jobs are stored, and loaded by ``specific``, as its concrete model.
    if isinstance(job, model._meta.concrete_model):
        return None
    return (
        f"Job {job.pk} has no row in {model.__name__}'s table ({model._meta.db_table}), the "
        f"table of its type {job.type!r}: the row was deleted without the job (by SQL or a "
        f"migration, say), or {model.__name__} is not the model the job was created with."
    )


def type_with_hooks_for(job: Job, hook: str) -> JobType | None:
    """The job type whose ``hook`` to call for ``job`` (its specific instance); None, logged,
    where the hook cannot run: the type was removed from the code, or the job's row of the
    type's model is missing. The job ends (or is deleted) all the same."""
    if job.type not in job_type_registry:
        logger.warning("Job %s: no job type %r to run %s of.", job.pk, job.type, hook)
        return None
    job_type = job_type_registry.get(job.type)
    missing = own_row_missing(job, job_type)
    if missing is not None:
        logger.warning("%s Its %s hook is not run.", missing, hook)
        return None
    return job_type


def announce_cancelled(job: Job, *, as_stored: bool = False) -> None:
    """Publish a job just cancelled (``as_stored``: from its row, which its run's changes to the
    instance did not reach), run its ``on_cancelled`` and send ``job_cancelled``."""
    if as_stored:
        publish_as_stored(job)
    else:
        publish(job)
    run_on_cancelled(job)
    signals.emit(signals.job_cancelled, job)


def run_on_cancelled(job: Job) -> None:
    """Run the job type's ``on_cancelled``; one that raises is logged."""
    job_type = type_with_hooks_for(job, "on_cancelled")
    if job_type is None:
        return
    try:
        job_type.on_cancelled(job)
    except Exception:
        logger.exception("Job %s: on_cancelled hook of %r raised", job.pk, job_type)


def announce_lost(
    job: Job, exc: TaskFerryError, *, publish_final: Callable[[Job], None] = publish
) -> None:
    """Publish a job just failed from outside its run (by the sweep, or a failed dispatch), run
    its ``on_error`` and send ``job_failed``."""
    # Loaded after the commit, so it carries the failed state.
    specific = job.specific
    publish_final(specific)
    job_type = type_with_hooks_for(specific, "on_error")
    if job_type is not None:
        try:
            job_type.on_error(specific, exc)
        except Exception:
            logger.exception("Job %s: on_error hook of %r raised", job.pk, job_type)
    signals.emit(signals.job_failed, specific, exc=exc)
    logger.error("Job %s (%s) failed: %s", job.pk, job.type, exc)


def moment_ago(age: datetime.timedelta) -> datetime.datetime:
    """``timezone.now() - age`` as the job tables' datetime columns hold it. With USE_TZ =
    False they hold naive local times, which jump an hour when daylight saving time starts or
    ends: subtracted in naive local time, a heartbeat written just before the clocks went
    forward looks an hour older, and the sweep failed every job running then. So the age is
    taken off in UTC, and the moment given back in local time."""
    now = timezone.now()
    if timezone.is_aware(now):
        return now - age
    zone = timezone.get_default_timezone()
    # In UTC: arithmetic on datetimes of one zone is naive too (it keeps the wall-clock time).
    utc_now = timezone.make_aware(now, zone).astimezone(datetime.UTC)
    return timezone.make_naive(utc_now - age, zone)


def parse_job_id(job_id: Any) -> int:
    """The id as an int; anything that is not a positive integer does not exist. Text must be
    plain digits: not "+5", " 5", "05" or "0_5", which int() would take. Bytes are not text,
    and a number must be whole: int() would take b" 5", and cut Decimal("5.5") to 5."""
    if isinstance(job_id, bool | bytes | bytearray | memoryview) or (
        isinstance(job_id, str)
        and not (job_id.isascii() and job_id.isdigit() and not job_id.startswith("0"))
    ):
        raise JobDoesNotExist(job_id)
    try:
        value = int(job_id)
    except (TypeError, ValueError, OverflowError):
        raise JobDoesNotExist(job_id) from None
    if value <= 0 or value > 2**63 - 1 or (not isinstance(job_id, str) and job_id != value):
        raise JobDoesNotExist(job_id)
    return value


class JobHandler:
    """Creates, cancels, looks up and cleans up jobs. All methods are class methods. Those
    named with an ``a`` first (``acreate_and_start``, ``aget_job``...) are the async
    counterparts of the others, for async views, as Django's ``aget()`` is of ``get()``."""

    @overload
    @classmethod
    def create_and_start(cls, /, user: Any, job_type_name: str, **values: Any) -> Job: ...

    @overload
    @classmethod
    def create_and_start(
        cls, /, user: Any, job_type_name: type[JobType[JobModelT]], **values: Any
    ) -> JobModelT: ...

    @classmethod
    def create_and_start(
        cls, /, user: Any, job_type_name: str | type[JobType[Any]], **values: Any
    ) -> Job:
        """Create a job of the type named ``job_type_name``, or of that registered ``JobType``
        class, for ``user`` (None for a system job) and hand it to the executor. Returns the
        saved, specific job at once: given ``ExportJobType``, a ``JobType[ExportJob]``, a type
        checker knows it is an ``ExportJob``."""
        from task_ferry.executors.base import get_executor

        job_type = job_type_registry.get_named_or_class(job_type_name)
        # Before the row: an EXECUTOR that cannot be loaded must not leave a job pending for
        # good, nor a store that cannot be built fail the call after the job ran.
        executor = get_executor()
        get_store()
        job = cls._create(user, job_type, values)
        signals.emit(signals.job_created, job)
        # No snapshot yet: the row says all there is to say about a pending job, and one nobody
        # polls before it starts needs none. The first poll stores one (``write_if_absent``).
        executor.enqueue_job(job)
        return job

    @overload
    @classmethod
    def create_and_start_many(
        cls, user: Any, job_type_name: str, values_list: Iterable[Mapping[str, Any]]
    ) -> list[Job]: ...

    @overload
    @classmethod
    def create_and_start_many(
        cls,
        user: Any,
        job_type_name: type[JobType[JobModelT]],
        values_list: Iterable[Mapping[str, Any]],
    ) -> list[JobModelT]: ...

    @classmethod
    def create_and_start_many(
        cls,
        user: Any,
        job_type_name: str | type[JobType[Any]],
        values_list: Iterable[Mapping[str, Any]],
    ) -> list[Any]:
        """Create one job of the type named ``job_type_name`` (or of that registered ``JobType``
        class, as for ``create_and_start``) for ``user`` per mapping of values, in one
        transaction, and hand them all to the executor. All or nothing: bad values for any of
        them raise ``InvalidJobValues`` naming its position, a batch that would pass the type's
        ``max_count`` raises ``MaxJobCountExceeded``, and then no job is created. Returns the
        saved, specific jobs in the order of ``values_list``.

        On PostgreSQL the rows of all the jobs take three statements however many there are
        (unless the type's model has its own ``save()``, save signal receivers or fields the
        database fills; then each job is saved on its own, as elsewhere). With an executor
        that runs jobs inline, each job runs once all are saved; the first error among them
        then reaches the caller after the rest have run."""
        job_type = job_type_registry.get_named_or_class(job_type_name)
        if isinstance(values_list, Mapping | str | bytes):
            raise InvalidJobValues(
                f"values_list must be a list of mappings, one per job; got one "
                f"{type(values_list).__name__}. For a single job, use create_and_start()."
            )
        if not isinstance(values_list, Iterable):
            raise InvalidJobValues(
                f"values_list must be a list of mappings, one per job; got "
                f"{type(values_list).__name__} {values_list!r}."
            )
        built: list[tuple[Job, dict[str, Any]]] = []
        for position, values in enumerate(values_list):
            if not isinstance(values, Mapping):
                raise InvalidJobValues(
                    f"Job {position}: values must be a mapping of field names to values, "
                    f"got {type(values).__name__}."
                )
            try:
                built.append(creation.build(user, job_type, dict(values)))
            except InvalidJobValues as exc:
                raise InvalidJobValues(f"Job {position}: {exc}", exc.errors) from exc
        if not built:
            return []
        jobs = [job for job, _prepared in built]
        clash = creation.clash_within(jobs)
        if clash is not None:
            raise clash
        from task_ferry.executors.base import get_executor

        executor = get_executor()
        get_store()
        try:
            with transaction.atomic(using=jobs_database()):
                creation.save_many(user, job_type, built)
                # As for create_and_start() calls in one atomic() block: the signals now, the
                # dispatch once the block commits; a failed dispatch fails the unsent rest.
                for job in jobs:
                    live_handles.track(job)
                    signals.emit(signals.job_created, job)
                if executor.dispatches_on_commit:
                    executor.enqueue_jobs(jobs)
        except IntegrityError as exc:
            raise creation.refused(user, exc) from exc
        if not executor.dispatches_on_commit:
            cls._run_each(executor, jobs)
        return jobs

    @overload
    @classmethod
    async def acreate_and_start(cls, /, user: Any, job_type_name: str, **values: Any) -> Job: ...

    @overload
    @classmethod
    async def acreate_and_start(
        cls, /, user: Any, job_type_name: type[JobType[JobModelT]], **values: Any
    ) -> JobModelT: ...

    @classmethod
    async def acreate_and_start(
        cls, /, user: Any, job_type_name: str | type[JobType[Any]], **values: Any
    ) -> Job:
        """The async counterpart of ``create_and_start()``, for async views: it runs on the
        thread Django gives sync ORM code (``sync_to_async``), dispatch included."""
        # Untyped here: sync_to_async would type the call by the first overload alone.
        create_and_start: Callable[..., Job] = cls.create_and_start
        return await sync_to_async(create_and_start)(user, job_type_name, **values)

    @overload
    @classmethod
    async def acreate_and_start_many(
        cls, user: Any, job_type_name: str, values_list: Iterable[Mapping[str, Any]]
    ) -> list[Job]: ...

    @overload
    @classmethod
    async def acreate_and_start_many(
        cls,
        user: Any,
        job_type_name: type[JobType[JobModelT]],
        values_list: Iterable[Mapping[str, Any]],
    ) -> list[JobModelT]: ...

    @classmethod
    async def acreate_and_start_many(
        cls,
        user: Any,
        job_type_name: str | type[JobType[Any]],
        values_list: Iterable[Mapping[str, Any]],
    ) -> list[Any]:
        """The async counterpart of ``create_and_start_many()``, run as
        ``acreate_and_start()`` runs."""
        create_and_start_many: Callable[..., list[Any]] = cls.create_and_start_many
        return await sync_to_async(create_and_start_many)(user, job_type_name, values_list)

    @staticmethod
    def _run_each(executor: Any, jobs: list[Job]) -> None:
        """Hand each job to an executor that runs it at once; re-raise the first error after
        all have run, so one failing job does not leave the others pending."""
        first_error: Exception | None = None
        for job in jobs:
            try:
                executor.enqueue_job(job)
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    @classmethod
    def _create(cls, user: Any, job_type: JobType, values: dict[str, Any]) -> Job:
        job, prepared = creation.build(user, job_type, values)
        try:
            creation.save(user, job_type, job, prepared)
        except IntegrityError as exc:
            # A user deleted meanwhile, or a unique constraint of the type's own fields.
            raise creation.refused(user, exc) from exc
        return live_handles.track(job)

    @classmethod
    def get_job(cls, user: Any, job_id: Any) -> Job:
        """The user's job as its specific model. ``JobDoesNotExist`` for a malformed id or a
        job of someone else; ``user=None`` looks up system jobs."""
        if isinstance(job_id, Job):
            raise TypeError(
                f"job_id takes the job's id (job.pk), not a Job: got {job_id!r}. Pass "
                f"job.pk, or cancel_job(job) to cancel a job you already hold without the "
                f"ownership check."
            )
        pk = parse_job_id(job_id)
        job = Job.objects.for_user(user).filter(pk=pk).first()
        if job is None:
            raise JobDoesNotExist(job_id)
        return live_handles.track(job.specific)

    @classmethod
    async def aget_job(cls, user: Any, job_id: Any) -> Job:
        """The async counterpart of ``get_job()``."""
        return await sync_to_async(cls.get_job)(user, job_id)

    @classmethod
    def get_jobs_for_user(cls, user: Any) -> JobQuerySet[Job]:
        """The user's jobs, newest first."""
        return Job.objects.for_user(user).order_by("-created_at", "-id")

    @classmethod
    def cancel(cls, user: Any, job_id: Any) -> Job:
        """Cancel the user's job. A pending job is cancelled at once and its ``on_cancelled``
        runs here (inside a transaction: when it commits, not at all if it rolls back); a
        running job is asked to stop and stops at its next progress tick. Cancelling an ended
        job changes nothing."""
        job = cls.get_job(user, job_id)
        return cls.cancel_job(job)

    @classmethod
    def cancel_job(cls, job: Job) -> Job:
        """Cancel ``job`` without an ownership check (for staff tools and system code)."""
        if not isinstance(job, Job):
            raise TypeError(
                f"cancel_job() takes a Job, not {type(job).__name__} {job!r}. By id: "
                f"JobHandler.cancel(user, job_id), which checks that the job is the user's, or "
                f"cancel_job(Job.objects.get(pk=job_id)) to skip that check."
            )
        if job.pk is None:
            raise ValueError(
                f"cancel_job() takes a saved job; this {type(job).__name__} has no id yet. Jobs "
                f"are created with JobHandler.create_and_start()."
            )
        if job.state == JobState.PENDING:
            if transition(job, JobState.CANCELLED, from_states=[JobState.PENDING]):
                # Inside the caller's transaction (ATOMIC_REQUESTS, say) the move is not
                # committed yet: a rollback leaves the job pending, and a worker will run it.
                after_commit(functools.partial(announce_cancelled, job), jobs_database())
                return job
            # It moved on since this instance was read: a worker took it, it ended, or it was
            # deleted. Only then is the row read: a running job's needs a request.
            try:
                job.refresh_from_db(fields=BASE_FIELDS)
            except ObjectDoesNotExist as exc:
                raise JobDoesNotExist(job.pk) from exc
        if job.state in (JobState.PENDING, JobState.STARTED):
            from task_ferry.monitor import get_monitor

            # A job running in this process stops at its very next tick.
            get_monitor().cancel_local(job.pk)
            # Never touch the row of a running job: its transaction may hold the row lock.
            # Sent at once, even inside the caller's transaction: the request writes no row
            # that a rollback could undo, and the job's run commits its own end.
            try:
                get_store().request_cancel(job.pk, token=cancel_token(job))
            except ProgressStoreUnavailable as exc:
                # Slower but not lost: the worker's monitor reads it at its next heartbeat.
                CancelRequest.objects.get_or_create(job_id=job.pk)
                logger.warning(
                    "Job %s: progress store unavailable (%s); cancel request recorded in the "
                    "database instead.",
                    job.pk,
                    exc,
                )
        return job

    @classmethod
    async def acancel(cls, user: Any, job_id: Any) -> Job:
        """The async counterpart of ``cancel()``: a pending job's ``on_cancelled`` runs on the
        thread Django gives sync ORM code."""
        return await sync_to_async(cls.cancel)(user, job_id)

    @classmethod
    async def acancel_job(cls, job: Job) -> Job:
        """The async counterpart of ``cancel_job()``."""
        return await sync_to_async(cls.cancel_job)(job)

    @staticmethod
    def expiry_cutoff(older_than: datetime.timedelta | None = None) -> datetime.datetime:
        """Ended jobs that finished before this moment are expired. ``older_than`` must be a
        ``timedelta`` of zero or more: a negative one would expire every ended job."""
        if older_than is None:
            older_than = datetime.timedelta(days=ferry_settings.JOB_EXPIRY_DAYS)
        if not isinstance(older_than, datetime.timedelta):
            raise TypeError(
                f"older_than must be a datetime.timedelta, got {type(older_than).__name__} "
                f"{older_than!r}: timedelta(days=7), say."
            )
        if older_than < datetime.timedelta(0):
            raise ValueError(
                f"older_than must be zero or more, got {older_than!r}: a negative age would "
                f"delete every ended job. timedelta(days=7) deletes those older than a week."
            )
        try:
            return moment_ago(older_than)
        except OverflowError:
            raise ValueError(
                f"older_than {older_than!r} reaches back before year 1, where dates end."
            ) from None

    @classmethod
    def cleanup_old_jobs(cls, *, older_than: datetime.timedelta | None = None) -> int:
        """Delete ended jobs older than ``JOB_EXPIRY_DAYS`` (or ``older_than``) in batches,
        calling each type's ``before_delete`` once per job; see ``task_ferry.cleanup``. Returns
        how many jobs were deleted."""
        from task_ferry.cleanup import delete_expired

        return delete_expired(cls.expiry_cutoff(older_than))

    @classmethod
    async def acleanup_old_jobs(cls, *, older_than: datetime.timedelta | None = None) -> int:
        """The async counterpart of ``cleanup_old_jobs()``."""
        return await sync_to_async(cls.cleanup_old_jobs)(older_than=older_than)

    @staticmethod
    def sweep_stale_jobs() -> int:
        """Fail started jobs whose heartbeat lapsed (their worker is gone) and pending jobs no
        worker took within ``PENDING_TIMEOUT``; see ``task_ferry.sweep``. Safe to run from
        several places at once. Returns how many jobs were failed."""
        from task_ferry.sweep import sweep_stale_jobs

        return sweep_stale_jobs()

    @classmethod
    def fail_undispatched(
        cls,
        job_id: int,
        *,
        error: str,
        human_readable_error: str,
        created_at: datetime.datetime | None = None,
    ) -> bool:
        """Fail a pending job its executor could not hand to a queue. False if it is no longer
        pending (or was rolled back). With ``created_at``, only the job created then: on
        SQLite, a job rolled back with a savepoint leaves its id to the next job created."""
        # Where it was just created: a replica may not have it yet.
        jobs = Job.objects.using(jobs_database()).filter(pk=job_id)
        if created_at is not None:
            jobs = jobs.filter(created_at=created_at)
        job = jobs.first()
        if job is None or not transition(
            job,
            JobState.FAILED,
            from_states=[JobState.PENDING],
            error=error,
            human_readable_error=human_readable_error,
        ):
            return False
        # As stored: the executor's error may be longer than a row keeps, or have a NUL.
        announce_lost(job, DispatchError(job.error))
        return True

    @staticmethod
    def run_job(
        job_id: int, *, heartbeat: bool = True, job_type_name: str | None = None
    ) -> Job | None:
        """Run a pending job in this process. Executors call this; see ``task_ferry.runner``.
        Passing the job's type name, when the executor has it, saves a query. ``heartbeat=False``
        writes no heartbeat rows (the sweep then judges the job by its ``started_at``); cancel
        requests reach the job all the same.

        Raises ``InvalidJobId``, before any query, for an id no job can have (``"abc"``, from a
        malformed or forged task message): the database would refuse it with an error naming
        neither the id nor the message."""
        from task_ferry.runner import JobRun

        try:
            job_id = parse_job_id(job_id)
        except JobDoesNotExist:
            raise InvalidJobId(job_id) from None
        if not isinstance(job_type_name, str):
            job_type_name = None  # Only a hint; a forged one must not stop the job.
        return JobRun(job_id, heartbeat=heartbeat, job_type_name=job_type_name).execute()
