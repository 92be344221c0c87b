"""Runs jobs as ``django.tasks`` tasks: Django 6's built-in ``django.tasks``, or the
``django-tasks`` backport on Django 5.2, whichever imports.

With ``TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}`` jobs are stored in
the database and run by ``python manage.py db_worker``. Every job runs through the task
``task_ferry.executors.django_tasks.run_job``; its path is stable, so workers on any host find it.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import logging
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from types import ModuleType
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error
from django.core.checks import Warning as CheckWarning
from django.db import transaction

from task_ferry.checks import (
    DATABASE_BACKEND,
    misplaced_database_backend,
    misplaced_tasks_backend_error,
)
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import (
    DispatchError,
    TaskFerryImproperlyConfigured,
)
from task_ferry.executors.base import (
    BaseExecutor,
    Outbox,
    WaitingQueue,
    describe_later,
    dispatch_on_commit,
)
from task_ferry.models import Job, jobs_database
from task_ferry.registry import JobType, job_type_registry

logger = logging.getLogger("task_ferry")

__all__ = [
    "DjangoTasksExecutor",
    "cleanup_old_jobs",
    "run_job",
    "sweep_stale_jobs",
    "tasks_api",
]

# What a user sees on a job that never reached a worker.
UNDISPATCHED_MESSAGE = "This job could not be queued, so it never started. Try again later."
# For a refusal that trying again cannot change: the type's queue or priority, the backend path.
MISCONFIGURED_MESSAGE = (
    "This job could not be queued because of a problem in this site's setup, so it never "
    "started. Trying again will not help until the site's administrators fix it."
)


def _load_tasks_api() -> tuple[ModuleType, ModuleType] | tuple[None, None]:
    """``django.tasks`` on Django 6+, else the ``django_tasks`` backport, else None; each with
    its ``base`` module (``Task`` and the defaults)."""
    for name in ("django.tasks", "django_tasks"):
        try:
            module = importlib.import_module(name)
            # Registers the receiver that rebuilds backends when TASKS changes.
            importlib.import_module(f"{name}.signals")
        except ImportError:
            continue
        return module, importlib.import_module(f"{name}.base")
    return None, None


tasks_api, tasks_base = _load_tasks_api()

if tasks_base is not None:
    _Task: Any = tasks_base.Task

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class FerryTask(_Task):
        """A ``Task`` validated by its backend at enqueue rather than at definition, so
        importing this module reads no settings and never fails on a TASKS mistake (the
        system checks report those instead)."""

        def __post_init__(self) -> None:
            pass


def queue_of(job_type: JobType) -> str:
    """The django.tasks queue that a job type's jobs go to: its own ``queue``, else
    django.tasks' default queue."""
    default_queue = "default" if tasks_base is None else tasks_base.DEFAULT_TASK_QUEUE_NAME
    queue: str = job_type.queue or default_queue
    return queue


def ferry_task(func: Callable[..., Any]) -> Any:
    """Make ``func`` a module-level ``django.tasks`` task (or leave it a plain function when
    neither django.tasks nor django-tasks is installed)."""
    if tasks_base is None:
        return func
    return FerryTask(
        func=func,
        priority=tasks_base.DEFAULT_TASK_PRIORITY,
        backend=tasks_base.DEFAULT_TASK_BACKEND_ALIAS,
        queue_name=tasks_base.DEFAULT_TASK_QUEUE_NAME,
        run_after=None,
    )


@ferry_task
def run_job(job_id: int, job_type_name: str | None = None) -> None:
    """Run one job. A job's own exception is re-raised after the job is marked failed, so the
    task result shows it failed too. ``job_type_name``, sent with every task, lets the start
    load the job as its type's model in the same statement (tasks without it still run)."""
    from task_ferry.exceptions import InvalidJobId
    from task_ferry.handler import JobHandler

    try:
        JobHandler.run_job(job_id, job_type_name=job_type_name)
    except InvalidJobId as exc:
        # The task result shows the failure; django.tasks never runs a failed task again.
        logger.error("Refused a run_job task: %s", exc)
        raise


@ferry_task
def sweep_stale_jobs() -> int:
    """Fail jobs whose worker died and pending jobs nobody took. Schedule it every minute or so."""
    from task_ferry.handler import JobHandler

    failed = JobHandler.sweep_stale_jobs()
    # db_worker logs that the task ran, not what it returned. Run every minute: a round that
    # found nothing is not worth a line at INFO.
    logger.log(
        logging.INFO if failed else logging.DEBUG,
        "sweep_stale_jobs: failed %d stale job(s).",
        failed,
    )
    return failed


@ferry_task
def cleanup_old_jobs() -> int:
    """Delete ended jobs older than ``JOB_EXPIRY_DAYS``. Schedule it daily."""
    from task_ferry.handler import JobHandler

    deleted = JobHandler.cleanup_old_jobs()
    logger.info(
        "cleanup_old_jobs: deleted %d ended job(s) older than JOB_EXPIRY_DAYS (%g days).",
        deleted,
        ferry_settings.JOB_EXPIRY_DAYS,
    )
    return deleted


class DjangoTasksExecutor(BaseExecutor):
    """Enqueues ``run_job`` on the ``TASK_FERRY["TASKS_BACKEND"]`` backend when the surrounding
    transaction commits. A job type's ``queue`` picks the queue (default: ``"default"``); its
    ``priority`` is passed on to backends whose ``supports_priority`` is true.

    If the backend refuses the task (unreachable, misconfigured), the job is marked failed (if
    the database can still be reached) and ``DispatchError`` reaches the caller, saying which:
    a job never waits for a task that does not exist.
    """

    supports_queues = True
    #: Only where the backend's ``supports_priority`` is true; otherwise priority is dropped.
    supports_priority = True

    @property
    def runs_out_of_process(self) -> bool:  # type: ignore[override]
        """False for ``ImmediateBackend``, which runs each task in the process that enqueues
        it (W023): that process's own cache is then shared with its jobs, so W003 keeps quiet.
        True for every other backend, and for one that cannot be built (E021 says why)."""
        if tasks_api is None:
            return True
        try:
            backend = tasks_api.task_backends[ferry_settings.TASKS_BACKEND]
        except Exception:
            return True
        return not isinstance(backend, _builtin_backend("immediate"))

    def enqueue(self, job_id: int) -> None:
        if tasks_api is None:
            raise TaskFerryImproperlyConfigured(_missing_api_message())
        self.enqueue_jobs([self.job_of(job_id)])

    def enqueue_job(self, job: Job) -> None:
        self.enqueue_jobs([job])

    def enqueue_jobs(self, jobs: list[Job]) -> None:
        if tasks_api is None:
            raise TaskFerryImproperlyConfigured(_missing_api_message())
        # The handler holds the jobs: their type gives queue and priority without a query.
        # django.tasks has no enqueue-on-commit; a rolled-back job must not reach a worker.
        dispatch_on_commit(
            jobs_database(),
            self.dispatch_many,
            [(job.pk, job.type) for job in jobs],
            {job.pk: job.created_at for job in jobs},
        )

    def dispatch_many(
        self, batch: list[tuple[int, str]], outbox: Outbox[tuple[int, str]] | None = None
    ) -> None:
        """``dispatch()`` each (job id, type name) in turn. After a failure, every job after it
        is marked failed too, with the rest of ``outbox`` (the jobs its transaction has still
        to dispatch, which Django will not), and the ``DispatchError`` says so."""
        outbox = outbox or Outbox()
        outbox.sending(batch)
        for index, (job_id, type_name) in enumerate(batch):
            try:
                self.dispatch(job_id, type_name)
            except DispatchError as exc:
                later: list[tuple[int, datetime.datetime | None]] = [
                    (later_id, None) for later_id, _type_name in batch[index + 1 :]
                ]
                later += [(item[0], created_at) for item, created_at in outbox.take_rest()]
                failed = [
                    later_id
                    for later_id, created_at in later
                    if self._fail_undispatched(
                        later_id,
                        f"Job {later_id} was not handed to the django.tasks backend: job "
                        f"{job_id} of the same transaction could not be, before it",
                        created_at,
                    )
                ]
                if not failed:
                    raise
                raise DispatchError(f"{exc} {describe_later(failed)}") from exc.__cause__

    def dispatch(self, job_id: int, type_name: str) -> None:
        """Enqueue the job's task now. Raises ``DispatchError`` after marking the job failed.

        A job cancelled before this point is still sent; the worker sees it is not pending and
        skips it, which costs less than a query on every dispatch."""
        alias = ferry_settings.TASKS_BACKEND
        try:
            task = self.task_for(job_type_registry.get(type_name))
            task.get_backend().validate_task(task)
            task.enqueue(job_id, type_name)
        except Exception as exc:
            message = (
                f"Job {job_id} could not be handed to the django.tasks backend {alias!r}: "
                f"{type(exc).__name__}: {str(exc).rstrip('.')}"
            )
            advice = refusal_advice(alias, exc)
            if self._fail_undispatched(
                job_id, message, human_readable_error=advice.human_readable_error
            ):
                outcome = "The job was marked failed."
            else:
                outcome = "The job was not marked failed here (see the log)."
            raise DispatchError(
                f"{message}. {outcome} {advice.fix}, then start the job again."
            ) from exc

    @staticmethod
    def _fail_undispatched(
        job_id: int,
        message: str,
        created_at: datetime.datetime | None = None,
        human_readable_error: str = UNDISPATCHED_MESSAGE,
    ) -> bool:
        """Mark the job failed; False if it was not (it left pending, was rolled back, or the
        database is down too and the stale-job sweep will fail it). ``created_at``, when
        given, must match the row's too."""
        from task_ferry.handler import JobHandler

        connection = transaction.get_connection(jobs_database())
        if not connection.in_atomic_block:
            # The backend's failure may have broken a shared database connection.
            connection.close_if_unusable_or_obsolete()
        try:
            return JobHandler.fail_undispatched(
                job_id,
                created_at=created_at,
                error=message,
                human_readable_error=human_readable_error,
            )
        except Exception:
            logger.exception("Job %s: could not mark the undispatched job failed", job_id)
            return False

    def task_for(self, job_type: JobType) -> Any:
        """The ``run_job`` task bound to the configured backend, the type's queue and, where
        the backend supports it, its priority."""
        assert tasks_api is not None and tasks_base is not None
        alias = ferry_settings.TASKS_BACKEND
        backend = tasks_api.task_backends[alias]
        if backend.supports_priority:
            priority = job_type.priority
        else:
            priority = tasks_base.DEFAULT_TASK_PRIORITY
        return run_job.using(
            backend=alias,
            queue_name=queue_of(job_type),
            priority=priority,
        )

    def waiting_queue(self, type_name: str) -> WaitingQueue:
        queue = queue_of(job_type_registry.get(type_name))
        alias = ferry_settings.TASKS_BACKEND
        name = f"the django.tasks queue {queue!r} of TASKS[{alias!r}]"
        if _configured_backend(alias) != DATABASE_BACKEND:
            return WaitingQueue(name=name)  # Its workers are the backend's own.
        default_alias = "default" if tasks_base is None else tasks_base.DEFAULT_TASK_BACKEND_ALIAS
        backend_option = "" if alias == default_alias else f" --backend {alias}"
        return WaitingQueue(
            name=name,
            worker_command=f"manage.py db_worker{backend_option} --queue-name {queue}",
        )

    def check(self) -> list[CheckMessage]:
        if tasks_api is None:
            return [
                Error(
                    _missing_api_message(),
                    hint='pip install "django-task-ferry[django-tasks]" (on Django 5.2 with '
                    'Python 3.12+: "django-task-ferry[django-tasks-backport]").',
                    id="task_ferry.E020",
                )
            ]
        alias = ferry_settings.TASKS_BACKEND
        tasks = getattr(settings, "TASKS", {})
        if not isinstance(alias, str) or not alias:
            aliases = sorted(map(str, tasks)) if isinstance(tasks, Mapping) else []
            return [
                Error(
                    f"TASK_FERRY['TASKS_BACKEND'] must be the alias of a backend in TASKS, a "
                    f"string; it is {alias!r}.",
                    hint=f'Set it to one of {aliases}, or leave it out for "default".',
                    id="task_ferry.E021",
                )
            ]
        if not isinstance(tasks, Mapping):
            return [
                Error(
                    f"No usable django.tasks backend {alias!r} for DjangoTasksExecutor: TASKS "
                    f"must be a dict of backends by alias, not a {type(tasks).__name__}.",
                    hint=f'Define TASKS = {{"{alias}": {{"BACKEND": "{DATABASE_BACKEND}"}}}}.',
                    id="task_ferry.E021",
                )
            ]
        misplaced = misplaced_database_backend(_configured_backend(alias))
        if misplaced is not None:
            return [misplaced_tasks_backend_error(alias, misplaced)]
        try:
            backend = tasks_api.task_backends[alias]
        except Exception as exc:
            if _configured_backend(alias) == DATABASE_BACKEND and not find_spec("django_tasks_db"):
                # Named right, but the package is not installed (Django 6 without the extra).
                hint = (
                    'pip install "django-task-ferry[django-tasks]" (it brings django-tasks-db), '
                    'add "django_tasks_db" to INSTALLED_APPS and run migrate.'
                )
            else:
                hint = (
                    f'Define TASKS = {{"{alias}": {{"BACKEND": "{DATABASE_BACKEND}"}}}} or '
                    f'point TASK_FERRY["TASKS_BACKEND"] at an alias of TASKS.'
                )
            return [
                Error(
                    f"No usable django.tasks backend {alias!r} for DjangoTasksExecutor: {exc}",
                    hint=hint,
                    id="task_ferry.E021",
                )
            ]
        return self._check_backend(alias, backend)

    def _check_backend(self, alias: str, backend: Any) -> list[CheckMessage]:
        assert tasks_api is not None and tasks_base is not None
        messages: list[CheckMessage] = []
        if isinstance(backend, _builtin_backend("immediate")):
            messages.append(
                CheckWarning(
                    f"The django.tasks backend {alias!r} is ImmediateBackend: jobs run inside "
                    f"the request that starts them, not in a worker.",
                    hint=f'Use "{DATABASE_BACKEND}" with manage.py db_worker, or '
                    f"TASK_FERRY['EXECUTOR'] = ImmediateExecutor if inline is what you want.",
                    id="task_ferry.W023",
                )
            )
        elif isinstance(backend, _builtin_backend("dummy")):
            messages.append(
                CheckWarning(
                    f"The django.tasks backend {alias!r} is DummyBackend: it stores tasks and "
                    f"never runs them, so jobs stay pending until the stale-job sweep fails them.",
                    hint=f'Use "{DATABASE_BACKEND}" with manage.py db_worker.',
                    id="task_ferry.W024",
                )
            )
        if type(backend).__module__.startswith("django_tasks_db") and not _app_installed(
            "django_tasks_db"
        ):
            messages.append(
                Error(
                    f"The django.tasks backend {alias!r} is {DATABASE_BACKEND} but "
                    f'"django_tasks_db" is not in INSTALLED_APPS.',
                    hint='Add "django_tasks_db" to INSTALLED_APPS and run migrate.',
                    id="task_ferry.E027",
                )
            )
        configured_queues = _configured_queues(alias)
        for job_type in job_type_registry.all():
            queue = queue_of(job_type)
            if backend.queues and queue not in backend.queues:
                if isinstance(configured_queues, str):
                    # django.tasks takes set("reports"): one queue per character.
                    queue_hint = (
                        f"TASKS[{alias!r}]['QUEUES'] is the string {configured_queues!r}, "
                        f"which django.tasks reads as one queue per character; make it a "
                        f"list, e.g. {[configured_queues]!r}."
                    )
                else:
                    queue_hint = (
                        f"Add {queue!r} to TASKS[{alias!r}]['QUEUES'] or change the type's queue."
                    )
                messages.append(
                    Error(
                        f"Job type {job_type.type!r} uses queue {queue!r}, which the "
                        f"django.tasks backend {alias!r} does not allow "
                        f"(QUEUES: {sorted(backend.queues)}); its jobs would fail to dispatch.",
                        hint=queue_hint,
                        obj=type(job_type),
                        id="task_ferry.E025",
                    )
                )
            low, high = tasks_base.TASK_MIN_PRIORITY, tasks_base.TASK_MAX_PRIORITY
            priority = job_type.priority
            if (
                isinstance(priority, bool)
                or not isinstance(priority, int)
                or not (low <= priority <= high)
            ):
                messages.append(
                    Error(
                        f"Job type {job_type.type!r} has priority {priority!r}; django.tasks "
                        f"takes a whole number from {low} to {high}.",
                        hint=f"Set {type(job_type).__qualname__}.priority within that range.",
                        obj=type(job_type),
                        id="task_ferry.E028",
                    )
                )
            elif priority and not backend.supports_priority:
                messages.append(
                    CheckWarning(
                        f"Job type {job_type.type!r} sets priority {job_type.priority}, but "
                        f"the django.tasks backend {alias!r} does not support priorities; "
                        f"it is ignored.",
                        hint="Use a backend with supports_priority (django_tasks_db does) or "
                        "remove the priority.",
                        obj=type(job_type),
                        id="task_ferry.W026",
                    )
                )
        return messages


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RefusalAdvice:
    """What to say of a task that the django.tasks backend refused."""

    fix: str
    """What the site's administrators should do before the job is started again."""
    human_readable_error: str
    """What the job's user is shown."""


def refusal_advice(alias: str, exc: Exception) -> RefusalAdvice:
    """What to do about ``exc``, raised by the backend ``alias`` when a task was validated or
    enqueued. A mistake in the settings comes first: trying again cannot help until it is fixed."""
    backend_path = _configured_backend(alias)
    if misplaced_database_backend(backend_path) is not None:
        return RefusalAdvice(
            fix=f'Use "BACKEND": "{DATABASE_BACKEND}" in TASKS[{alias!r}]',
            human_readable_error=MISCONFIGURED_MESSAGE,
        )
    if backend_path == DATABASE_BACKEND and not _app_installed("django_tasks_db"):
        # Its model then refuses to load; "reachable and set up" would not say why.
        return RefusalAdvice(
            fix=(
                'Add "django_tasks_db" to INSTALLED_APPS and run migrate '
                "(manage.py check reports this as task_ferry.E027)"
            ),
            human_readable_error=MISCONFIGURED_MESSAGE,
        )
    if _is_invalid_task(exc):
        # The backend is fine; the task it was given is not (its queue, its priority).
        return RefusalAdvice(
            fix=(
                f"Add the job type's queue to TASKS[{alias!r}]['QUEUES'] or change it, or "
                f"fix its priority (manage.py check names the problem)"
            ),
            human_readable_error=MISCONFIGURED_MESSAGE,
        )
    return RefusalAdvice(
        fix=(
            f"Check that the TASKS backend is reachable and set up (for "
            f"{DATABASE_BACKEND}: its database and migrations)"
        ),
        human_readable_error=UNDISPATCHED_MESSAGE,
    )


def _builtin_backend(name: str) -> type[Any]:
    """django.tasks' ``ImmediateBackend`` (``"immediate"``) or ``DummyBackend`` (``"dummy"``),
    from whichever of django.tasks and the backport is installed."""
    assert tasks_api is not None
    module = importlib.import_module(f"{tasks_api.__name__}.backends.{name}")
    backend: type[Any] = getattr(module, f"{name.capitalize()}Backend")
    return backend


def _configured(alias: str, key: str) -> Any:
    """What ``TASKS[alias][key]`` is, as written in the settings; None where it is missing or
    ``TASKS`` is not laid out as a dict of dicts (``check`` reports that)."""
    tasks = getattr(settings, "TASKS", None)
    params = tasks.get(alias) if isinstance(tasks, Mapping) else None
    return params.get(key) if isinstance(params, Mapping) else None


def _configured_backend(alias: str) -> str | None:
    """The BACKEND path that TASKS names for ``alias``, as written in the settings."""
    backend: str | None = _configured(alias, "BACKEND")
    return backend


def _configured_queues(alias: str) -> Any:
    """The QUEUES that TASKS gives for ``alias``, as written in the settings."""
    return _configured(alias, "QUEUES")


def _is_invalid_task(exc: BaseException) -> bool:
    """Whether ``exc`` is django.tasks' refusal of the task itself (``InvalidTask``, the
    backport's ``InvalidTaskError``), not a failure of the backend."""
    assert tasks_api is not None
    exceptions = importlib.import_module(f"{tasks_api.__name__}.exceptions")
    invalid = getattr(exceptions, "InvalidTask", None) or exceptions.InvalidTaskError
    return isinstance(exc, invalid)


def _app_installed(name: str) -> bool:
    from django.apps import apps

    return apps.is_installed(name)


def _missing_api_message() -> str:
    return (
        "DjangoTasksExecutor needs django.tasks (Django 6.0+) or the django-tasks backport "
        "(Django 5.2); neither can be imported."
    )
