"""The cleanup of old jobs (``JobHandler.cleanup_old_jobs()``): the ended jobs past
``JOB_EXPIRY_DAYS`` deleted in batches, each job's ``before_delete`` hook called once, one run
at a time across processes and hosts (``RunLock``; on SQLite, across the processes that share
its database file), a job that a protecting foreign key keeps left and logged rather than
stopping the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import DatabaseError, router, transaction
from django.db.models import Exists, Model, OuterRef
from django.db.models.deletion import (
    CASCADE,
    PROTECT,
    RESTRICT,
    Collector,
    ProtectedError,
    RestrictedError,
)

from task_ferry.handler import StoreRound, cleanup_round
from task_ferry.models import ENDED_STATES, CancelRequest, Heartbeat, Job, jobs_database
from task_ferry.registry import JobType, job_type_registry

try:
    import fcntl
except ImportError:  # Windows: SQLite's cleanups run without a lock there.
    HAS_FCNTL = False
else:
    HAS_FCNTL = True

__all__ = ["CLEANUP_BATCH_SIZE", "RunLock", "delete_expired", "run_lock"]

logger = logging.getLogger("task_ferry")

CLEANUP_BATCH_SIZE = 500
# How long a cleanup batch's transaction (PostgreSQL) goes on calling before_delete hooks.
CLEANUP_TRANSACTION_SECONDS = 5.0


def delete_expired(cutoff: datetime.datetime) -> int:
    """Delete the ended jobs that finished before ``cutoff``, in batches, calling each type's
    ``before_delete`` once per job. Returns how many jobs were deleted."""
    cleanup = StoreRound()
    token = cleanup_round.set(cleanup)
    try:
        return _delete_in_batches(cutoff)
    finally:
        cleanup_round.reset(token)
        if cleanup.skipped:
            logger.warning(
                "cleanup_old_jobs: the progress store was not called again after it failed; "
                "snapshots of %d more deleted jobs not forgotten (they expire on their own).",
                cleanup.skipped,
            )


def _delete_in_batches(cutoff: datetime.datetime) -> int:
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
                batch_deleted, last_id = _delete_batch(batch, cutoff, deadline)
                deleted += batch_deleted
        # Rows a worker wrote for a job in the moment it was deleted (no foreign-key
        # constraint stops them): nothing else would remove them.
        job_gone = ~Exists(Job.objects.filter(pk=OuterRef("job_id")))
        Heartbeat.objects.filter(job_gone).delete()
        CancelRequest.objects.filter(job_gone).delete()
    return deleted


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
    transaction-level lock, ``GET_LOCK()`` held for the whole run.

    SQLite has one writer at a time, but its statements commit one by one here, so two runs
    (cron's and Celery beat's, in processes of their own) both loaded the same batch and
    called its hooks. Its lock is held for the whole run too: ``flock()`` on a file next to the
    database's, named after it and the lock (``db.sqlite3-task_ferry.cleanup_old_jobs.lock``),
    not on the database's own file: closing a descriptor of that would drop the locks SQLite
    holds on it in the process. The file is empty and holds no lock once its process is gone,
    so one left behind is harmless; it stays, as removing it would let a run lock a file
    another has just replaced. Where the file cannot be opened (in a directory SQLite could not
    write its journal to either) or locked, the run goes on without a lock, as before, with a
    warning; on a platform without ``fcntl`` (Windows), without a lock and without a warning.
    An in-memory database (the tests') is seen by one process only: a lock in the process is
    enough."""

    def __init__(self, name: str, using: str) -> None:
        self.name = name
        self.using = using
        self.connection = transaction.get_connection(using)
        #: Whether each batch is a transaction (else each of its statements commits alone).
        self.batches_are_transactions = self.connection.vendor == "postgresql"
        #: The run's lock where it is held for the run (not PostgreSQL's): None until asked
        #: for, then whether held.
        self.held: bool | None = None
        #: On SQLite, the descriptor of the lock file the run holds flock() on, or the lock of
        #: an in-memory database it holds.
        self._lock_file: int | None = None
        self._memory_lock: threading.Lock | None = None

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
            elif self.connection.vendor == "sqlite":
                self.held = self._lock_sqlite()
            else:
                self.held = True
        return self.held

    def _lock_sqlite(self) -> bool:
        database = self.connection.settings_dict["NAME"]
        if sqlite_in_memory(database):
            lock = _memory_lock(f"{self.name}:{database}")
            if not lock.acquire(blocking=False):
                return False
            self._memory_lock = lock
            return True
        if not HAS_FCNTL:
            return True
        # A database that cannot be opened fails as it did, not with a lock file's warning
        # before.
        self.connection.ensure_connection()
        path = sqlite_lock_path(self.name, database)
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:
                # Created by another user (cron's, say): flock() needs it open, not writable.
                fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            logger.warning("%s: cannot open %s (%s); running without a lock.", self.name, path, exc)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            logger.warning("%s: cannot lock %s (%s); running without a lock.", self.name, path, exc)
            return True
        self._lock_file = fd
        return True

    def release(self) -> None:
        """Release the run's lock, if it took one; a broken connection took a GET_LOCK() along,
        and a process's end its flock()."""
        if self.held and self.connection.vendor == "mysql":
            with contextlib.suppress(DatabaseError), self.connection.cursor() as cursor:
                cursor.execute("SELECT RELEASE_LOCK(%s)", [self._mysql_name()])
        if self._lock_file is not None:
            fd, self._lock_file = self._lock_file, None
            try:
                # Released even where a process forked by a hook still has the file open.
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        if self._memory_lock is not None:
            lock, self._memory_lock = self._memory_lock, None
            lock.release()
        self.held = None

    def _mysql_name(self) -> str:
        # Its locks are server-wide: one per database.
        length = (
            MARIADB_LOCK_NAME_LENGTH
            if self.connection.display_name == "MariaDB"
            else MYSQL_LOCK_NAME_LENGTH
        )
        return mysql_lock_name(self.name, self.connection.settings_dict["NAME"], length)


def sqlite_in_memory(database: str | os.PathLike[str]) -> bool:
    """Whether the SQLite database named ``database`` is in memory, as Django tells."""
    return isinstance(database, str) and (database == ":memory:" or "mode=memory" in database)


def sqlite_lock_path(name: str, database: str | os.PathLike[str]) -> str:
    """The lock file of the lock ``name`` on the SQLite database file ``database`` (a path, or a
    ``file:`` URI, which Django's backend accepts): beside it, named after its real path, so
    that every name of one file (relative, through a symbolic link) gets the same lock."""
    path = os.fspath(database)
    if path.startswith("file:"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
    return f"{os.path.realpath(path)}-{name}.lock"


_memory_locks: dict[str, threading.Lock] = {}
_memory_locks_guard = threading.Lock()


def _memory_lock(key: str) -> threading.Lock:
    with _memory_locks_guard:
        return _memory_locks.setdefault(key, threading.Lock())


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
