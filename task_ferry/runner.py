"""One run of one job, from pending to an ended state. Executors call
``JobHandler.run_job(job_id)``, which builds a ``JobRun``.

The job's ``run()`` executes inside one database transaction, so a failed or cancelled job
leaves none of its own writes behind. The move to ``finished`` is the last statement of that
transaction (the work and its success commit together, or neither does); the moves to
``started``, ``failed`` and ``cancelled`` are committed on their own, so they are never rolled
back. The moves to ``started`` and ``cancelled`` do not wait for the disk (see
``handler.transition``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import traceback
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction

from task_ferry import signals
from task_ferry.exceptions import (
    JobCancelled,
    JobFenced,
    JobRowMissing,
    JobTimeLimitExceeded,
    JobTypeDoesNotExist,
)
from task_ferry.handler import (
    announce_cancelled,
    own_row_missing,
    publish,
    publish_as_stored,
    run_on_cancelled,
    start_and_load,
    transition,
    type_with_hooks_for,
)
from task_ferry.models import Job, JobState, jobs_database
from task_ferry.monitor import Watch, get_monitor
from task_ferry.progress import Progress
from task_ferry.registry import JobType, job_type_registry
from task_ferry.snapshot import storable

logger = logging.getLogger("task_ferry")

# Shown to users when a job fails with an error of its own code.
GENERIC_FAILURE = "Something went wrong while running this job."
# Shown when the job's database connection broke (server restart, killed backend, network).
DATABASE_FAILURE = "The database connection was lost while running this job. Start it again."
# Shown when the process running the job stopped under it (db_worker's second SIGTERM, Ctrl-C).
INTERRUPTED_FAILURE = "This job was interrupted before it could finish. Start it again."
# What Django puts in a database left empty in DATABASES (``"default": {}``).
NO_ENGINE = "django.db.backends.dummy"


def describe(exc: BaseException) -> str:
    """``"<ExceptionClass>: <message>"``, also for an exception whose ``str()`` raises."""
    try:
        message = str(exc)
    except Exception:
        # What the traceback module shows: the job must be marked failed all the same.
        message = "<exception str() failed>"
    return f"{type(exc).__name__}: {message}"


def error_for_operators(exc: BaseException) -> str:
    """The failed job's ``error``: ``describe(exc)``, or, where the process running the job
    stopped under it, what stopped it and what to do ("SystemExit: 1" alone says neither)."""
    described = describe(exc)
    if isinstance(exc, SystemExit):
        return (
            f"The process running this job exited while the job ran "
            f"({described.removesuffix(': ')}): its worker was stopped before the job ended "
            f"(db_worker is, at a second SIGTERM or Ctrl-C; a Celery worker's pool process, at "
            f"a cold shutdown or the task's hard time limit), or the job's code called "
            f"sys.exit(). Start the job again."
        )
    if isinstance(exc, KeyboardInterrupt):
        return (
            f"The process running this job was interrupted while the job ran "
            f"({described.removesuffix(': ')}): Ctrl-C or SIGINT before the job ended. Start "
            f"the job again."
        )
    return described


def message_for_users(exc: BaseException, *, connection_lost: bool = False) -> str:
    """The exception's ``human_readable_error``, or else a sentence for its kind: the process
    was stopped, the database connection was lost, or the generic one."""
    try:
        message = str(getattr(exc, "human_readable_error", None) or "")
    except Exception:
        # A property or __str__ that raises: the job must be marked failed all the same.
        message = ""
    if message.strip():
        return message
    if isinstance(exc, SystemExit | KeyboardInterrupt):
        return INTERRUPTED_FAILURE
    return DATABASE_FAILURE if connection_lost else GENERIC_FAILURE


# The most of a traceback that is stored: a statement over MariaDB's max_allowed_packet
# (16 MiB by default) is refused, and the job's failure with it.
TRACEBACK_MAX_LENGTH = 100_000


def shorten_traceback(text: str) -> str:
    """The traceback as stored: a huge one (an exception quoting a whole file) keeps its start
    and its end, where the frames and the exception's own line are."""
    if len(text) <= TRACEBACK_MAX_LENGTH:
        return text
    keep = TRACEBACK_MAX_LENGTH // 2
    left_out = len(text) - 2 * keep
    return f"{text[:keep]}\n[… {left_out} characters left out …]\n{text[-keep:]}"


def stored_traceback(exc: BaseException) -> str:
    """The failed job's ``traceback``: the exception's, shortened and made storable."""
    return storable(shorten_traceback("".join(traceback.format_exception(exc))))


def reconnect_if_broken() -> None:
    """A dropped database connection must not stop us from recording how the job ended."""
    # Not close_if_unusable_or_obsolete(): with CONN_MAX_AGE = 0 every connection is
    # "obsolete", and reconnecting would cost the cancel path several milliseconds.
    connection = connections[jobs_database()]
    if not connection.in_atomic_block and connection.errors_occurred:
        if not connection.is_usable():
            connection.close()
        connection.errors_occurred = False


def run_databases() -> list[str]:
    """The databases whose transaction a job's ``run()`` executes in: the jobs' own, so that
    its finish commits with its work, and ``default`` where a router keeps jobs elsewhere (the
    job's work most likely goes there) and ``default`` is a database: Django's multi-database
    layout may leave it empty. The jobs' one is opened first and committed last."""
    using = jobs_database()
    if (
        using == DEFAULT_DB_ALIAS
        or connections[DEFAULT_DB_ALIAS].settings_dict["ENGINE"] == NO_ENGINE
    ):
        return [using]
    return [using, DEFAULT_DB_ALIAS]


def nothing_to_commit(aliases: list[str]) -> bool:
    """Whether the transactions of the outermost ``atomic()`` blocks open on these databases
    have sent nothing yet and hold no ``on_commit`` callbacks, so that committing them would do
    nothing. PostgreSQL only: the other backends begin at the block's start (SQLite, where
    that costs no round trip) or cannot tell (MySQL)."""
    for alias in aliases:
        connection = connections[alias]
        if connection.vendor != "postgresql" or connection.connection is None:
            return False
        if connection.savepoint_ids or connection.run_on_commit or connection.needs_rollback:
            return False
        # psycopg 2 and 3 both number the idle state 0: no transaction block begun.
        if connection.connection.info.transaction_status != 0:
            return False
    return True


@functools.cache
def own_attnames(model: type[Job]) -> tuple[str, ...]:
    return tuple(f.attname for f in model.own_fields())


def own_values(job: Job) -> tuple[Any, ...]:
    """The job's own field values, containers copied, to tell later whether a run changed them."""
    return tuple(
        copy.deepcopy(value) if isinstance(value, dict | list | set) else value
        for value in (getattr(job, name) for name in own_attnames(type(job)))
    )


def time_limit_error(exc: BaseException, time_limit: float) -> JobTimeLimitExceeded:
    """What a job stopped at its time limit fails with: the ``JobTimeLimitExceeded`` its tick
    raised, or a new one where the run raised something else on its way out."""
    if isinstance(exc, JobTimeLimitExceeded):
        return exc
    error = JobTimeLimitExceeded(time_limit)
    error.__cause__ = exc
    return error


def lost_during_run(databases: list[str], opened: dict[str, Any]) -> bool:
    """After a database error of a run: whether it was a connection of the run that broke.
    Either database's: the job's work mostly goes to ``default``."""
    if opened:
        # Django replaces a connection when rolling back on it failed: it broke.
        return any(
            connections[alias].connection is not db_connection
            for alias, db_connection in opened.items()
        )
    # In autocommit mode nothing was rolled back: ask the connections that had an error.
    return any(
        connections[alias].errors_occurred and not connections[alias].is_usable()
        for alias in databases
        if connections[alias].connection is not None
    )


def refuse_unrun_body(job_type: JobType, returned: object) -> None:
    """Raise ``TypeError`` if ``run()`` gave back a coroutine or a generator: its body never ran
    (an ``async def`` behind a decorator that hides it from registration, say), and the job
    must not be marked finished."""
    if inspect.iscoroutine(returned) or inspect.isgenerator(returned):
        returned.close()
    elif not inspect.isasyncgen(returned) and not inspect.isawaitable(returned):
        return
    raise TypeError(
        f"{type(job_type).__qualname__}.run returned {type(returned).__name__} {returned!r} "
        f"instead of running: task_ferry calls run() as a plain function. Make it a plain "
        f"`def` (call async code in it with asgiref's async_to_sync)."
    )


class JobRun:
    def __init__(
        self, job_id: int, *, heartbeat: bool = True, job_type_name: str | None = None
    ) -> None:
        self.job_id = job_id
        self.heartbeat = heartbeat
        # Given by executors that know it, to load the job in one query instead of two.
        self.job_type_name = job_type_name

    def execute(self) -> Job | None:
        """Run the job if it is still pending. Returns the job, or None if it was not run.

        Re-raises the job's own exception (``KeyboardInterrupt`` and ``SystemExit`` included)
        after the job is marked failed.
        """
        job = self._start()
        if job is None:
            # Cancelled before it started, or already taken by another delivery.
            logger.info("Job %s is not pending; not running it.", self.job_id)
            return None
        try:
            job_type = job_type_registry.get(job.type)
            missing = own_row_missing(job, job_type)
            if missing is not None:
                raise JobRowMissing(f"{missing} Its own fields are gone: start it again.")
            self._own_values = own_values(job)
            progress = Progress()
            # Inside a caller's transaction no other connection sees the job, so there is
            # nobody to beat for, nor a request in the database to read (only this process can
            # cancel it).
            databases = run_databases()
            connection = connections[databases[0]]
            own_transaction = not connection.in_atomic_block
            # The DB-API connection of each database the run's transaction is open on.
            opened: dict[str, Any] = {}
            # The monitor publishes the start like any progress, within PUBLISH_INTERVAL: a job
            # that ends sooner goes from pending to its end with one write to the store, not two.
            watch = get_monitor().watch(
                job,
                progress,
                heartbeat=self.heartbeat,
                visible=own_transaction,
                time_limit=job_type.time_limit,
            )
        except JobTypeDoesNotExist as exc:
            self._end_unrunnable(
                job,
                f"The worker that took this job has no job type {job.type!r} ({exc}) Run the "
                f"same code in workers as where jobs are created.",
                exc,
            )
            raise
        except JobRowMissing as exc:
            self._end_unrunnable(job, str(exc), exc)
            raise
        except BaseException as exc:
            # Ctrl-C, a monitor thread that could not start, a field value that cannot be
            # copied: left started, the job would wait for the stale-job sweep.
            self._end_unstarted(job, exc)
            raise
        try:
            # Inside: a receiver's Ctrl-C or sys.exit() (send_robust lets those through) must
            # fail the job and stop its watch, not leave it started and beating for nobody.
            signals.emit(signals.job_started, job)
            with contextlib.ExitStack() as run_transaction:
                for alias in databases if job_type.atomic else []:
                    run_transaction.enter_context(transaction.atomic(using=alias))
                    opened[alias] = connections[alias].connection
                # Typed None, but a subclass's run() may be an async def in disguise.
                returned = job_type.run(job, progress)  # type: ignore[func-returns-value]
                if returned is not None:
                    refuse_unrun_body(job_type, returned)
                if progress.cancel_raised:
                    # It caught JobCancelled (an ``except Exception`` around a loop's body, say).
                    raise JobCancelled(f"Job {job.pk} returned after it was cancelled.")
                _percentage, label = watch.stop()
                # A run that sent the database nothing has no work to commit with its success:
                # the finish then commits on its own, one round trip instead of three. So does
                # the finish of a run in autocommit mode, whose work is committed already.
                finish_inside = bool(opened) and not (
                    own_transaction and nothing_to_commit(databases)
                )
                if finish_inside:
                    self._finish(job, label)
            if not finish_inside:
                self._finish(job, label)
        except JobCancelled as exc:
            error = self._end_stopped(job, job_type, watch, exc, progress.time_limit_reached)
            if error is None:
                return job
            if error is exc:
                raise
            raise error from exc
        except JobFenced:
            with contextlib.suppress(ObjectDoesNotExist):
                job.refresh_from_db(
                    fields=["state", "error", "human_readable_error", "finished_at"]
                )
            work = "its work was rolled back" if opened else "its work, committed as it went, stays"
            if self._deleted_while_running(job, watch):
                # It ended before a tick could stop it: as if stopped at one.
                logger.info("Job %s was deleted while it ran; %s.", job.pk, work)
                run_on_cancelled(job)
            else:
                logger.warning(
                    "Job %s was ended or deleted elsewhere while it ran; %s.", job.pk, work
                )
            return job
        except Exception as exc:
            if progress.cancel_raised:
                # Raised on the way out of a cancel (JobCancelled wrapped in an error of its
                # own, or cleanup that failed): the job stops because it was cancelled, or
                # because it ran out of time.
                logger.info("Job %s raised %r after it was cancelled.", job.pk, exc)
                error = self._end_stopped(job, job_type, watch, exc, progress.time_limit_reached)
                if error is None:
                    return job
                raise error from exc
            connection_lost = isinstance(exc, DatabaseError) and lost_during_run(databases, opened)
            self._end_failed(job, job_type, watch, exc, connection_lost=connection_lost)
            raise
        except BaseException as exc:
            # Ctrl-C, sys.exit(), a killed greenlet; past the run's time limit, the SIGTERM of
            # Celery's hard time limit. The process may live on, so the job is failed now
            # rather than left started until the sweep.
            time_limit = progress.time_limit_reached
            stopped = exc if time_limit is None else time_limit_error(exc, time_limit)
            self._end_failed(job, job_type, watch, stopped)
            raise
        finally:
            watch.stop()
        publish(job)
        signals.emit(signals.job_finished, job)
        return job

    @staticmethod
    def _finish(job: Job, label: str) -> None:
        if not transition(
            job,
            JobState.FINISHED,
            from_states=[JobState.STARTED],
            progress_percentage=100,
            progress_state=label,
        ):
            raise JobFenced(f"Job {job.pk} was ended elsewhere while it ran.")

    def _start(self) -> Job | None:
        """Move the job from pending to started and load it; None if it was not pending."""
        name = self.job_type_name
        if name is not None and name in job_type_registry:
            # One round trip on PostgreSQL instead of four.
            job = start_and_load(self.job_id, name, job_type_registry.get(name).model_class)
            if job is not None:
                return job
        job = Job(pk=self.job_id)
        started = transition(job, JobState.STARTED, from_states=[JobState.PENDING], flush=False)
        return self._load() if started else None

    def _load(self) -> Job:
        """The job as its type's own model, read where it was just started: a replica that a
        router reads from may not have it yet."""
        using = jobs_database()
        if self.job_type_name is not None and self.job_type_name in job_type_registry:
            model: type[Job] = job_type_registry.get(self.job_type_name).model_class
            job = model._base_manager.using(using).filter(pk=self.job_id).first()
            if job is not None and job.type == self.job_type_name:
                return job
        return Job.objects.using(using).get(pk=self.job_id).specific

    def _run_changed(self, job: Job) -> bool:
        """Whether the run changed the job's own fields on the instance: their writes, if any,
        were rolled back, so the instance no longer shows the row."""
        return own_values(job) != self._own_values

    @staticmethod
    def _end_unrunnable(job: Job, error: str, exc: Exception) -> None:
        """Fail a job this worker cannot run: its type is not here (removed, or not deployed
        here yet), or its row of the type's model is missing. Left started, nothing would end
        it until the sweep. No hook: it would take an instance of the type's model."""
        if transition(
            job,
            JobState.FAILED,
            from_states=[JobState.STARTED],
            error=error,
            human_readable_error=GENERIC_FAILURE,
        ):
            publish_as_stored(job)
            logger.error("Job %s failed: %s", job.pk, error)
            signals.emit(signals.job_failed, job, exc=exc)

    def _end_unstarted(self, job: Job, exc: BaseException) -> None:
        """Fail a job whose run could not be set up, with the texts and hook a run's failure
        gets: nothing else would end it until the sweep. No watch to stop: the monitor's
        ``watch()`` leaves none behind when it raises, and it is the last step of the set-up."""
        if not transition(
            job,
            JobState.FAILED,
            from_states=[JobState.STARTED],
            error=error_for_operators(exc),
            human_readable_error=message_for_users(exc),
            traceback=stored_traceback(exc),
        ):
            return
        publish_as_stored(job)
        logger.error("Job %s (%s) failed: %s", job.pk, job.type, job.error, exc_info=exc)
        job_type = type_with_hooks_for(job, "on_error")
        if job_type is not None:
            self._run_on_error(job, job_type, exc)
        signals.emit(signals.job_failed, job, exc=exc)

    def _end_stopped(
        self,
        job: Job,
        job_type: JobType,
        watch: Watch,
        exc: BaseException,
        time_limit: float | None,
    ) -> JobTimeLimitExceeded | None:
        """End a run that a tick stopped (``exc`` is what reached the runner): cancelled, or,
        past its ``time_limit``, failed. Then returns the error to raise on, a failure like any
        other: it reaches the caller, and Celery's or django.tasks' monitoring sees it."""
        if time_limit is None:
            self._end_cancelled(job, job_type, watch)
            return None
        error = time_limit_error(exc, time_limit)
        self._end_failed(job, job_type, watch, error)
        return error

    def _end_cancelled(self, job: Job, job_type: JobType, watch: Watch) -> None:
        percentage, _label = watch.stop()
        reconnect_if_broken()
        # How far it got stays; its last label ("step 3 of 10") would read as work still going
        # on beside "cancelled". A failed job keeps its label: where it failed.
        moved = transition(
            job,
            JobState.CANCELLED,
            from_states=[JobState.STARTED],
            flush=False,
            progress_percentage=percentage,
            progress_state="",
        )
        if moved:
            announce_cancelled(job, as_stored=self._run_changed(job))
            return
        # Ended elsewhere (by the stale-job sweep), or deleted.
        if self._deleted_while_running(job, watch):
            run_on_cancelled(job)

    def _end_failed(
        self,
        job: Job,
        job_type: JobType,
        watch: Watch,
        exc: BaseException,
        *,
        connection_lost: bool = False,
    ) -> None:
        percentage, label = watch.stop()
        reconnect_if_broken()
        # Its error texts are cut and made storable by transition(): one the database refuses
        # would leave the job started.
        error = error_for_operators(exc)
        if not transition(
            job,
            JobState.FAILED,
            from_states=[JobState.STARTED],
            progress_percentage=percentage,
            progress_state=label,
            error=error,
            human_readable_error=message_for_users(exc, connection_lost=connection_lost),
            traceback=stored_traceback(exc),
        ):
            if self._deleted_while_running(job, watch):
                self._run_on_error(job, job_type, exc)
            return
        if self._run_changed(job):
            publish_as_stored(job)
        else:
            publish(job)
        logger.error("Job %s (%s) failed: %s", job.pk, job.type, job.error, exc_info=exc)
        self._run_on_error(job, job_type, exc)
        signals.emit(signals.job_failed, job, exc=exc)

    @staticmethod
    def _deleted_while_running(job: Job, watch: Watch) -> bool:
        """For a run whose end found its job no longer ``started``: publish the job as its row
        stands (its monitor may have published it live over the other party's end), and say
        whether the row was deleted while the job ran (its owner's account, say), not after
        the stale-job sweep had failed it. Only its type can then clean up what the run left
        outside the database, with the hook its end calls for; no signal, as its state never
        changed."""
        return not publish_as_stored(job) and watch.deleted_while_started()

    @staticmethod
    def _run_on_error(job: Job, job_type: JobType, exc: BaseException) -> None:
        try:
            job_type.on_error(job, exc)
        except Exception:
            logger.exception("Job %s: on_error hook of %r raised", job.pk, job_type)
