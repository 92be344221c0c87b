"""The service layer: every job state change goes through here.

Views, the admin, management commands and executors call ``JobHandler``; none of them writes
job rows on its own. State changes are compare-and-set ``UPDATE``s, so each job reaches
exactly one ended state and its ending hook runs once, whoever races for it. Checking a new
job's values and saving it is ``task_ferry.creation``'s part; ``task_ferry.runner`` runs one.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import functools
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

from django.contrib.contenttypes.models import ContentType
from django.db import DatabaseError, IntegrityError, router, transaction
from django.db.models import Exists, Model, OuterRef, Q
from django.db.models.deletion import (
    CASCADE,
    PROTECT,
    RESTRICT,
    Collector,
    ProtectedError,
    RestrictedError,
)
from django.db.models.signals import post_delete
from django.utils import timezone

from task_ferry import creation, signals, statements
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import (
    DispatchError,
    InvalidJobId,
    InvalidJobValues,
    JobDoesNotExist,
    JobLost,
    ProgressStoreUnavailable,
    SnapshotsNotForgotten,
    TaskFerryError,
)
from task_ferry.models import (
    ENDED_STATES,
    LIVE_STATES,
    CancelRequest,
    Heartbeat,
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
    snapshot_of,
    truncate_error,
    truncate_state,
)
from task_ferry.stores.base import get_store
from task_ferry.transactions import call_on_commit, lock_for_writing, pending_call

logger = logging.getLogger("task_ferry")

__all__ = ["JobHandler"]

CLEANUP_BATCH_SIZE = 500
# How long a cleanup batch's transaction (PostgreSQL) goes on calling before_delete hooks.
CLEANUP_TRANSACTION_SECONDS = 5.0
ERROR_FIELDS = frozenset({"error", "human_readable_error"})


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
        logger.warning(
            "Job %s: progress store unavailable, snapshot not published: %s", job.pk, exc
        )


def after_commit(callback: Callable[[], None]) -> None:
    """Call ``callback`` once the transaction open where jobs are written commits (at once in
    autocommit mode), and never if it rolls back: the store, a hook or a receiver must not
    announce a state change that a rollback undoes. Robust, so that a callback of ours that
    raises is logged and never stops the caller's own callbacks (an executor's dispatch)."""
    transaction.on_commit(callback, using=jobs_database(), robust=True)


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
_cleanup_round: contextvars.ContextVar[StoreRound | None] = contextvars.ContextVar(
    "task_ferry_cleanup_round", default=None
)


def forget_snapshots(job_ids: Collection[int]) -> None:
    """Have the store forget these jobs' snapshots; an unreachable store only logs. During a
    ``cleanup_old_jobs`` run, through its round."""
    cleanup = _cleanup_round.get()
    (StoreRound() if cleanup is None else cleanup).forget(job_ids)


class RunLock:
    """The database-wide lock that lets one maintenance run at a time (``cleanup_old_jobs``)
    work through its batches: ``with run_lock(name) as lock:`` around the run, and
    ``with lock.batch() as alone:`` around each batch, which it may do if ``alone``.

    On PostgreSQL each batch is a transaction that takes a transaction-level advisory lock.
    A session-level one would be taken and released by two statements, which a pooler in
    transaction mode (PgBouncer's usual setting in front of Django) may send to two server
    connections: the release would then miss, and the lock stay with a pooled connection that
    lets later runs through, or turns them away, at random. So a run that starts between two
    batches of another takes over, and the other stops at its next batch; each batch is still
    loaded, handed to the hooks and deleted by one run only. On MySQL and MariaDB, which have no
    transaction-level lock, ``GET_LOCK()`` held for the whole run; on SQLite, with one writer
    anyway, no lock."""

    def __init__(self, name: str, using: str) -> None:
        self.name = name
        self.using = using
        self.connection = transaction.get_connection(using)
        #: Whether each batch is a transaction (else each of its statements commits alone).
        self.batches_are_transactions = self.connection.vendor == "postgresql"
        #: The run's GET_LOCK() on MySQL and MariaDB: None until asked for, then whether held.
        self.held: bool | None = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[bool]:
        if not self.batches_are_transactions:
            yield self._held_for_the_run()
            return
        with transaction.atomic(using=self.using):
            with self.connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", [self.name])
                alone = bool(cursor.fetchone()[0])
            yield alone

    def _held_for_the_run(self) -> bool:
        if self.held is None:
            if self.connection.vendor == "mysql":
                with self.connection.cursor() as cursor:
                    cursor.execute("SELECT GET_LOCK(%s, 0)", [self._mysql_name()])
                    self.held = bool(cursor.fetchone()[0])
            else:
                self.held = True
        return self.held

    def release(self) -> None:
        """Release the run's GET_LOCK(), if it took one; a broken connection took it along."""
        if self.held and self.connection.vendor == "mysql":
            with contextlib.suppress(DatabaseError), self.connection.cursor() as cursor:
                cursor.execute("SELECT RELEASE_LOCK(%s)", [self._mysql_name()])
        self.held = None

    def _mysql_name(self) -> str:
        # Its locks are server-wide: one per database.
        length = (
            MARIADB_LOCK_NAME_LENGTH
            if self.connection.display_name == "MariaDB"
            else MYSQL_LOCK_NAME_LENGTH
        )
        return mysql_lock_name(self.name, self.connection.settings_dict["NAME"], length)


@contextlib.contextmanager
def run_lock(name: str) -> Iterator[RunLock]:
    """The ``RunLock`` named ``name`` on the jobs' database, released when the block ends."""
    lock = RunLock(name, jobs_database())
    try:
        yield lock
    finally:
        lock.release()


# The longest GET_LOCK() names MySQL 8 and MariaDB take.
MYSQL_LOCK_NAME_LENGTH = 64
MARIADB_LOCK_NAME_LENGTH = 192


def mysql_lock_name(name: str, database: str, length: int = MYSQL_LOCK_NAME_LENGTH) -> str:
    """``name:database``, or, where that is longer than ``length``, ``name:`` and as much of a
    digest of the database's name as fits."""
    full = f"{name}:{database}"
    if len(full) <= length:
        return full
    digest = hashlib.sha256(database.encode()).hexdigest()
    return f"{name}:{digest}"[:length]


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
    """Creates, cancels, looks up and cleans up jobs. All methods are class methods."""

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
        job_type = job_type_registry.get_named_or_class(job_type_name)
        job = cls._create(user, job_type, values)
        signals.emit(signals.job_created, job)
        # No snapshot yet: the row says all there is to say about a pending job, and one nobody
        # polls before it starts needs none. The first poll stores one (``write_if_absent``).
        from task_ferry.executors.base import get_executor

        get_executor().enqueue_job(job)
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
        pk = parse_job_id(job_id)
        job = Job.objects.for_user(user).filter(pk=pk).first()
        if job is None:
            raise JobDoesNotExist(job_id)
        return live_handles.track(job.specific)

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
        if job.state == JobState.PENDING and transition(
            job, JobState.CANCELLED, from_states=[JobState.PENDING]
        ):
            # Inside the caller's transaction (ATOMIC_REQUESTS, say) the move is not committed
            # yet: a rollback leaves the job pending, and a worker will run it.
            after_commit(functools.partial(cls._after_cancelled, job))
            return job
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

    @staticmethod
    def _after_cancelled(job: Job, *, as_stored: bool = False) -> None:
        """Publish the cancelled job (``as_stored``: from its row, which its run's changes to the
        instance did not reach), then run its hook."""
        if as_stored:
            publish_as_stored(job)
        else:
            publish(job)
        JobHandler._run_on_cancelled(job)
        signals.emit(signals.job_cancelled, job)

    @staticmethod
    def _run_on_cancelled(job: Job) -> None:
        """Run the job type's ``on_cancelled``; one that raises is logged."""
        job_type = type_with_hooks_for(job, "on_cancelled")
        if job_type is None:
            return
        try:
            job_type.on_cancelled(job)
        except Exception:
            logger.exception("Job %s: on_cancelled hook of %r raised", job.pk, job_type)

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
        """Delete ended jobs older than ``JOB_EXPIRY_DAYS`` in batches, calling each type's
        ``before_delete`` once per job. Returns how many jobs were deleted."""
        cutoff = cls.expiry_cutoff(older_than)
        cleanup = StoreRound()
        token = _cleanup_round.set(cleanup)
        try:
            return cls._cleanup_in_batches(cutoff)
        finally:
            _cleanup_round.reset(token)
            if cleanup.skipped:
                logger.warning(
                    "cleanup_old_jobs: the progress store was not called again after it failed; "
                    "snapshots of %d more deleted jobs not forgotten (they expire on their own).",
                    cleanup.skipped,
                )

    @classmethod
    def _cleanup_in_batches(cls, cutoff: datetime.datetime) -> int:
        deleted = 0
        last_id = 0
        with run_lock("task_ferry.cleanup_old_jobs") as lock:
            while True:
                # Counted from before the transaction begins, so that no hook but its first
                # starts later into it than CLEANUP_TRANSACTION_SECONDS (see _call_before_delete).
                deadline = (
                    time.monotonic() + CLEANUP_TRANSACTION_SECONDS
                    if lock.batches_are_transactions
                    else None
                )
                with lock.batch() as alone:
                    if not alone:
                        # Both would call before_delete for the same jobs (cron and beat, say).
                        if last_id == 0:
                            logger.warning(
                                "cleanup_old_jobs: another cleanup is running; this one stops."
                            )
                            return 0
                        logger.info(
                            "cleanup_old_jobs: another cleanup took over after %d jobs.", deleted
                        )
                        return deleted
                    batch = list(
                        Job.objects.using(lock.using)
                        .expired(cutoff)
                        .filter(pk__gt=last_id)
                        .order_by("pk")
                        .values_list("pk", "type", "content_type_id")[:CLEANUP_BATCH_SIZE]
                    )
                    if not batch:
                        break
                    batch_deleted, last_id = cls._delete_batch(batch, cutoff, deadline)
                    deleted += batch_deleted
            # Rows a worker wrote for a job in the moment it was deleted (no foreign-key
            # constraint stops them): nothing else would remove them.
            job_gone = ~Exists(Job.objects.filter(pk=OuterRef("job_id")))
            Heartbeat.objects.filter(job_gone).delete()
            CancelRequest.objects.filter(job_gone).delete()
        return deleted

    @staticmethod
    def _delete_batch(
        batch: list[tuple[int, str, int]], cutoff: datetime.datetime, deadline: float | None
    ) -> tuple[int, int]:
        """Call the ``before_delete`` hooks of ``batch``'s jobs and delete them. Returns how many
        jobs were deleted and the id of the last job handled: past ``deadline`` (a
        ``time.monotonic()``), the jobs after the last one hooked are left to the next batch."""
        by_model: dict[tuple[str, int], list[int]] = {}
        for pk, type_name, content_type_id in batch:
            by_model.setdefault((type_name, content_type_id), []).append(pk)
        groups: list[ExpiredOfType] = []
        hooked: list[tuple[int, Model, JobType[Any]]] = []
        for (type_name, content_type_id), ids in by_model.items():
            model = ContentType.objects.get_for_id(content_type_id).model_class() or Job
            # Loaded through the job's own model, so deleting them needs no query per parent row;
            # the filter re-checks that each job is still expired. Read where jobs are written
            # (in the batch's transaction, on PostgreSQL): a replica may still show jobs another
            # cleanup has deleted, whose before_delete would then run twice.
            jobs = list(
                model._base_manager.using(jobs_database()).filter(
                    pk__in=ids, state__in=ENDED_STATES, finished_at__lt=cutoff
                )
            )
            kept: list[tuple[int, str]] = []
            # Before _deletable() leaves out the protected ones, which have their model's row.
            loaded = {job.pk for job in jobs}
            jobs = _deletable(model, jobs, kept=kept)
            job_type = job_type_registry.get(type_name) if type_name in job_type_registry else None
            # A type without the hook costs no savepoint and no look at the clock.
            if job_type is not None and type(job_type).before_delete is not JobType.before_delete:
                hooked.extend((job.pk, job, job_type) for job in jobs)
            groups.append(
                ExpiredOfType(
                    type_name=type_name,
                    model=model,
                    registered=job_type is not None,
                    ids=ids,
                    loaded=loaded,
                    jobs=jobs,
                    kept=kept,
                )
            )
        cut_after = _call_before_delete(hooked, deadline)
        last_id = batch[-1][0] if cut_after is None else cut_after
        deleted = 0
        for group in groups:
            for pk, reason in group.kept:
                if pk <= last_id:
                    logger.warning("cleanup_old_jobs: job %s is kept: %s", pk, reason)
            jobs = [job for job in group.jobs if job.pk <= last_id]
            if not group.registered and jobs:
                # Once per batch: a removed type may leave thousands.
                logger.warning(
                    "cleanup_old_jobs: no job type %r to run before_delete of; deleting %d of "
                    "its expired jobs without it.",
                    group.type_name,
                    len(jobs),
                )
            deleted += _delete_jobs(group.model, jobs)
            missing = [pk for pk in group.ids if pk <= last_id and pk not in group.loaded]
            if group.model is not Job and missing:
                # Jobs whose row of the model is missing, which loading through it cannot find:
                # left, they would never be deleted. Their before_delete cannot run.
                orphans = list(
                    Job._base_manager.using(jobs_database()).filter(
                        pk__in=missing, state__in=ENDED_STATES, finished_at__lt=cutoff
                    )
                )
                for job in orphans:
                    logger.warning(
                        "Job %s: no row in %s's table; deleting the job without its "
                        "before_delete hook.",
                        job.pk,
                        group.model.__name__,
                    )
                deleted += _delete_jobs(Job, orphans)
        return deleted, last_id

    @classmethod
    def sweep_stale_jobs(cls) -> int:
        """Fail started jobs whose heartbeat lapsed (their worker is gone) and pending jobs no
        worker took within ``PENDING_TIMEOUT``. Safe to run from several places at once.

        Returns how many jobs were failed."""
        timeout = ferry_settings.HEARTBEAT_TIMEOUT
        cutoff = moment_ago(datetime.timedelta(seconds=timeout))
        # A job beats within HEARTBEAT_INTERVAL of its start; one with no beat yet that started
        # before the cutoff died early (short jobs never need to beat).
        lapsed = Exists(Heartbeat.objects.filter(job_id=OuterRef("pk"), beat_at__lt=cutoff)) | (
            ~Exists(Heartbeat.objects.filter(job_id=OuterRef("pk"))) & Q(started_at__lt=cutoff)
        )
        store = StoreRound(
            lost_warning="Sweep: progress store unavailable, no more snapshots read or published "
            "this round; a later round publishes those of the jobs it fails: %s"
        )
        failed = cls._fail_each(
            Job.objects.running().filter(lapsed),
            JobState.STARTED,
            f"The worker running this job stopped responding for over {timeout:g} seconds "
            f"(worker lost). Start the job again.",
            store,
        )
        pending_timeout = ferry_settings.PENDING_TIMEOUT
        if pending_timeout is not None:
            failed += cls._fail_each(
                Job.objects.pending().filter(
                    created_at__lt=moment_ago(datetime.timedelta(seconds=pending_timeout))
                ),
                JobState.PENDING,
                f"No worker picked up this job within {pending_timeout:g} seconds. Check that "
                f"workers are running and consume this job's queue, then start it again.",
                store,
            )
        cls._republish_ended(
            moment_ago(datetime.timedelta(seconds=ferry_settings.PROGRESS_CACHE_TIMEOUT)), store
        )
        return failed

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
        cls._after_lost(job, DispatchError(job.error))
        return True

    @staticmethod
    def _republish_ended(since: datetime.datetime, store: StoreRound) -> None:
        """Rewrite snapshots that still show a job as live after it ended: its final publish
        failed while the store was unreachable (or the sweep round that failed it had found the
        store so), and pollers would wait until the key expired."""
        ended = Job.objects.ended().filter(finished_at__gte=since).order_by("pk")
        last_id = 0
        while not store.unavailable:
            ids = list(
                ended.filter(pk__gt=last_id).values_list("pk", flat=True)[:CLEANUP_BATCH_SIZE]
            )
            if not ids:
                return
            last_id = ids[-1]
            snapshots = store.read_many(ids)
            stale = [
                pk for pk, snapshot in snapshots.items() if snapshot.get("state") in LIVE_STATES
            ]
            for job in Job.objects.filter(pk__in=stale):
                logger.info("Job %s: republishing its final state to the progress store.", job.pk)
                store.publish(job)

    @classmethod
    def _fail_each(
        cls,
        candidates: JobQuerySet[Job],
        from_state: JobState,
        message: str,
        store: StoreRound,
    ) -> int:
        failed = 0
        ids = list(candidates.order_by("pk").values_list("pk", flat=True))
        for start in range(0, len(ids), CLEANUP_BATCH_SIZE):
            batch = ids[start : start + CLEANUP_BATCH_SIZE]
            # Read before any row is locked: a store that hangs would hold each lock for its
            # timeout. Matched to each job by created_at once its row is locked.
            published = store.read_many(batch) if from_state == JobState.STARTED else {}
            for pk in batch:
                with transaction.atomic(using=jobs_database()):
                    lock_for_writing(jobs_database())
                    # A row locked by a live transaction (a frozen worker's) is retried next
                    # sweep rather than blocking this one.
                    job = candidates.select_for_update(skip_locked=True).filter(pk=pk).first()
                    if job is None or not transition(
                        job,
                        JobState.FAILED,
                        from_states=[from_state],
                        error=message,
                        human_readable_error=message,
                        **last_progress(job, published.get(pk)),
                    ):
                        continue
                cls._after_lost(job, JobLost(message), publish_final=store.publish)
                failed += 1
        return failed

    @staticmethod
    def _after_lost(
        job: Job, exc: TaskFerryError, *, publish_final: Callable[[Job], None] = publish
    ) -> None:
        """Publish and run the hooks of a job just failed from outside its run."""
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpiredOfType:
    """The jobs of one type in a cleanup batch."""

    type_name: str
    #: The type's own model, through which its jobs are loaded and deleted.
    model: type[Model]
    #: Whether the type is in the registry (its jobs are deleted without a hook if not).
    registered: bool
    #: The batch's ids of the type's jobs.
    ids: list[int]
    #: The ids of those loaded through ``model``: the others have no row of it.
    loaded: set[int]
    #: Those loaded that no protecting foreign key keeps.
    jobs: list[Model]
    #: The ids of those kept, with the reason, to be logged.
    kept: list[tuple[int, str]]


def _call_before_delete(
    hooked: list[tuple[int, Model, JobType[Any]]], deadline: float | None
) -> int | None:
    """Call each job's ``before_delete``, in id order, each in a savepoint of its own inside the
    batch's transaction (PostgreSQL): a query of one that fails cannot abort the batch. Once a
    hook returns past ``deadline``, the others are not called: returns the id of the last job
    hooked then, else None.

    Hooks are often slow (files removed from S3: 50 to 500 ms each), and a transaction open for
    500 of them (minutes) holds the batch's row locks and a pooled connection, and holds back
    PostgreSQL's xmin horizon, so vacuum cleans no dead row anywhere in the database
    meanwhile. Past the deadline the batch deletes the jobs hooked so far and commits, and the
    next batch starts after the last of them: a transaction lasts about the deadline and one
    hook more, and calls at least one hook, so the cleanup goes on however slow hooks are. The
    hooks stay inside the transaction, and a job's hook and delete in the same one, because
    the advisory lock that keeps two cleanups off the same jobs lasts as long as it (a
    session-level lock goes astray behind a pooler in transaction mode, see ``RunLock``) and
    because what a hook writes is meant to commit with the delete. Hooks in id order make the
    jobs handled a prefix of the batch, so "after the last of them" misses none."""
    in_batch = transaction.get_connection(jobs_database()).in_atomic_block
    hooked.sort(key=lambda entry: entry[0])
    for index, (pk, job, job_type) in enumerate(hooked):
        try:
            with (
                transaction.atomic(using=jobs_database()) if in_batch else contextlib.nullcontext()
            ):
                job_type.before_delete(job)
        except Exception:
            logger.exception(
                "Job %s: before_delete hook of %r raised; deleting anyway", job.pk, job_type
            )
        if deadline is not None and index + 1 < len(hooked) and time.monotonic() >= deadline:
            return pk
    return None


def _delete_jobs(model: type[Model], jobs: Sequence[Model]) -> int:
    """Delete ``jobs``, loaded through ``model``; how many ``Job`` rows went. Its post_delete
    receiver forgets their snapshots once the delete commits."""
    if not jobs:
        return 0
    collector = Collector(using=router.db_for_write(model))
    try:
        collector.collect(jobs)
    except (ProtectedError, RestrictedError):
        # Protected since _deletable() looked (by a before_delete hook, say).
        jobs = _deletable(model, jobs, known_protected=True)
        if not jobs:
            return 0
        collector = Collector(using=router.db_for_write(model))
        collector.collect(jobs)
    _, per_model = collector.delete()
    return per_model.get(Job._meta.label, 0)


def _deletable(
    model: type[Model],
    jobs: Sequence[Model],
    *,
    known_protected: bool = False,
    kept: list[tuple[int, str]] | None = None,
) -> list[Model]:
    """Those of ``jobs`` that no row keeps from being deleted. A foreign key to a job, or to its
    model, with ``on_delete=PROTECT`` or ``RESTRICT`` keeps the job: it is logged (or, with
    ``kept``, added to it with the reason, for the caller to log) and left, so that it stops
    neither the rest of the clean-up nor later ones, and its ``before_delete`` is not called.
    Costs nothing where no such foreign key exists."""
    if not jobs or not (known_protected or _may_be_protected(model)):
        return list(jobs)
    using = router.db_for_write(model)
    if not known_protected:
        try:
            Collector(using=using).collect(jobs)
            return list(jobs)
        except (ProtectedError, RestrictedError):
            pass
    deletable = []
    for job in jobs:
        try:
            Collector(using=using).collect([job])
        except (ProtectedError, RestrictedError) as exc:
            if kept is None:
                logger.warning("cleanup_old_jobs: job %s is kept: %s", job.pk, exc.args[0])
            else:
                kept.append((job.pk, exc.args[0]))
        else:
            deletable.append(job)
    return deletable


@functools.cache
def _may_be_protected(model: type[Model]) -> bool:
    """Whether a foreign key with ``on_delete=PROTECT`` or ``RESTRICT`` points at ``model``, one
    of its parents (``Job``), or a model whose rows deleting ``model``'s cascades to."""
    return _protection_reaches(model, frozenset())


def _protection_reaches(model: type[Model], seen: frozenset[type[Model]]) -> bool:
    for relation in model._meta.get_fields(include_hidden=True):
        if not (
            relation.auto_created
            and not relation.concrete
            and (relation.one_to_many or relation.one_to_one)
        ):
            continue
        on_delete = getattr(relation, "on_delete", None)
        if on_delete in (PROTECT, RESTRICT):
            return True
        related = relation.related_model
        # A child model's rows (parent links) belong to jobs of other types.
        if (
            on_delete is CASCADE
            and not getattr(relation, "parent_link", False)
            and isinstance(related, type)
            and related not in seen
            and _protection_reaches(related, seen | {model})
        ):
            return True
    return False
