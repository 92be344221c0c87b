"""The executor interface, and ``get_executor()`` which builds the configured one."""

from __future__ import annotations

import dataclasses
import datetime
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from django.core.checks import CheckMessage, Error
from django.utils.module_loading import import_string

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import TaskFerryImproperlyConfigured
from task_ferry.transactions import call_on_commit, pending_call

if TYPE_CHECKING:
    from task_ferry.models import Job


@dataclasses.dataclass(frozen=True, kw_only=True)
class WaitingQueue:
    """Where a dispatched job waits for a worker, as an operator looks for it."""

    #: The queue, as the executor names it: ``"the Celery queue 'exports'"``.
    name: str
    #: A command that starts a worker taking jobs from it; empty when there is none to give.
    worker_command: str = ""


class BaseExecutor(ABC):
    #: Jobs run in another process, so they need heartbeats and the stale-job sweep.
    runs_out_of_process: bool = True
    #: Dispatch waits for the surrounding transaction to commit.
    dispatches_on_commit: bool = True
    #: Job types' ``queue`` is honoured.
    supports_queues: bool = False
    #: Job types' ``priority`` is honoured.
    supports_priority: bool = False

    @abstractmethod
    def enqueue(self, job_id: int) -> None:
        """Arrange for ``JobHandler.run_job(job_id)`` to be called."""

    @staticmethod
    def type_of(job_id: int) -> str:
        """The type name of a job known only by its id (one query)."""
        from task_ferry.exceptions import JobDoesNotExist
        from task_ferry.models import Job, jobs_database

        type_name = (
            Job.objects.using(jobs_database())
            .filter(pk=job_id)
            .values_list("type", flat=True)
            .first()
        )
        if type_name is None:
            raise JobDoesNotExist(job_id)
        return type_name

    @staticmethod
    def job_of(job_id: int) -> Job:
        """A job known only by its id, with its type and ``created_at`` (one query)."""
        from task_ferry.exceptions import JobDoesNotExist
        from task_ferry.models import Job, jobs_database

        jobs = Job.objects.using(jobs_database())
        job = jobs.only("type", "created_at").filter(pk=job_id).first()
        if job is None:
            raise JobDoesNotExist(job_id)
        return job

    def enqueue_job(self, job: Job) -> None:
        """Dispatch a job the handler has just created. Executors that route by job type
        override this to read the type from ``job`` instead of querying it by id."""
        self.enqueue(job.pk)

    def enqueue_jobs(self, jobs: list[Job]) -> None:
        """Dispatch jobs the handler has just created together (``create_and_start_many``),
        in their order. Executors that can send several messages at once override this."""
        for job in jobs:
            self.enqueue_job(job)

    def waiting_queue(self, type_name: str) -> WaitingQueue | None:
        """Where jobs of the type named ``type_name`` wait for a worker, for the error of a job
        none took (the stale-job sweep's); None for executors without queues. May raise (a
        type no longer registered): the caller then names no queue."""
        return None

    def check(self) -> list[CheckMessage]:
        """System-check messages about this executor's configuration."""
        return []


Item = TypeVar("Item", bound=tuple[Any, ...])


class Outbox(Generic[Item]):
    """What one transaction still has to dispatch: its items (job id first) by job id, shared
    by the on-commit callbacks ``dispatch_on_commit`` registers for it.

    When one callback fails, Django drops the later ones: ``take_rest()`` names the jobs that
    will not be sent and must be failed. A job rolled back with a savepoint stays listed, and
    on SQLite its id can since have been given to another transaction's job: each job is kept
    with its ``created_at``, which the failing matches as well as its id.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[Item, datetime.datetime]] = {}

    def add(self, items: list[Item], created_at: Mapping[int, datetime.datetime]) -> None:
        self._items.update((item[0], (item, created_at[item[0]])) for item in items)

    def sending(self, items: list[Item]) -> None:
        """These items are being sent: they are no longer the rest's."""
        for item in items:
            self._items.pop(item[0], None)

    def take_rest(self) -> list[tuple[Item, datetime.datetime]]:
        """The items not sent, each with its job's ``created_at``."""
        rest = list(self._items.values())
        self._items.clear()
        return rest


def dispatch_on_commit(
    using: str,
    send: Callable[[list[Item], Outbox[Item]], object],
    items: list[Item],
    created_at: Mapping[int, datetime.datetime],
) -> None:
    """Call ``send(items, outbox)`` once the current transaction on ``using`` commits (at once
    in autocommit mode). ``outbox`` is the transaction's: found through its own on-commit
    callbacks, so a job started by another transaction's commit hook, or in another thread,
    gets its own. ``created_at`` gives each item's job's, by job id."""
    pending = pending_call(send, using)
    outbox: Outbox[Item] = pending.args[1] if pending is not None else Outbox()
    outbox.add(items, created_at)
    call_on_commit(functools.partial(send, items, outbox), using)


def describe_later(ids: list[int], after: str = "it") -> str:
    """The sentence that says which later jobs of the transaction were failed with a send."""
    return (
        f"The {len(ids)} job(s) after {after} in the same transaction ({describe_ids(ids)}) "
        f"were marked failed too."
    )


def describe_ids(ids: list[int]) -> str:
    """``"ids 4 to 9"`` for a run of consecutive ids, else the ids themselves (a few of them)."""
    if len(ids) == 1:
        return f"id {ids[0]}"
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"ids {ids[0]} to {ids[-1]}"
    shown = ", ".join(str(job_id) for job_id in ids[:5])
    return f"ids {shown}" + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


# Modules an executor needs, and the extra that installs them.
EXTRA_FOR_MODULE = {
    "celery": "celery",
    "kombu": "celery",
    "django_tasks": "django-tasks",
    "django_tasks_db": "django-tasks",
}


def missing_extra(exc: ImportError) -> str | None:
    """The django-task-ferry extra whose package failed to import in ``exc``, if any (a
    misspelt class in an executor module is a typo, not a missing extra)."""
    missing = (exc.name or "").split(".")[0]
    return EXTRA_FOR_MODULE.get(missing)


def describe_import_error(path: str, exc: ImportError) -> tuple[str, str]:
    """What is wrong with an ``EXECUTOR`` that does not import, and how to fix it: shared by
    check E001 and the error ``get_executor()`` raises where no check ran (pytest-django)."""
    extra = missing_extra(exc)
    if extra is not None:
        return (
            f"TASK_FERRY['EXECUTOR'] = {path!r} needs the {extra!r} extra, which is not "
            f"installed: {exc}.",
            f'Install it: pip install "django-task-ferry[{extra}]".',
        )
    return (
        f"TASK_FERRY['EXECUTOR'] = {path!r} cannot be imported: {exc}.",
        "Fix the dotted path. The executors are "
        "task_ferry.executors.immediate.ImmediateExecutor, "
        "task_ferry.executors.celery.CeleryExecutor and "
        "task_ferry.executors.django_tasks.DjangoTasksExecutor.",
    )


@functools.cache
def get_executor() -> BaseExecutor:
    """The configured executor, built once per process (reset when settings change)."""
    path = ferry_settings.EXECUTOR
    try:
        executor_class = import_string(path)
    except ImportError as exc:
        message, fix = describe_import_error(path, exc)
        raise TaskFerryImproperlyConfigured(f"{message} {fix}") from exc
    if not (isinstance(executor_class, type) and issubclass(executor_class, BaseExecutor)):
        raise TaskFerryImproperlyConfigured(
            f"TASK_FERRY['EXECUTOR'] = {path!r} is not a subclass of "
            f"task_ferry.executors.base.BaseExecutor."
        )
    executor: BaseExecutor = executor_class()
    return executor


def check_executor() -> list[CheckMessage]:
    try:
        executor = get_executor()
    except TaskFerryImproperlyConfigured as exc:
        return [
            Error(
                str(exc),
                hint="Set TASK_FERRY['EXECUTOR'] to one of "
                "task_ferry.executors.immediate.ImmediateExecutor, "
                "task_ferry.executors.celery.CeleryExecutor or "
                "task_ferry.executors.django_tasks.DjangoTasksExecutor.",
                id="task_ferry.E001",
            )
        ]
    return executor.check()
