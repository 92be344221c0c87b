"""The executor interface, and ``get_executor()`` which builds the configured one."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.core.checks import CheckMessage, Error
from django.db import transaction
from django.utils.module_loading import import_string

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import TaskFerryImproperlyConfigured

if TYPE_CHECKING:
    from task_ferry.models import Job


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
        from task_ferry.models import Job

        type_name = Job.objects.filter(pk=job_id).values_list("type", flat=True).first()
        if type_name is None:
            raise JobDoesNotExist(job_id)
        return type_name

    def enqueue_job(self, job: Job) -> None:
        """Dispatch a job the handler has just created. Executors that route by job type
        override this to read the type from ``job`` instead of querying it by id."""
        self.enqueue(job.pk)

    def enqueue_jobs(self, jobs: list[Job]) -> None:
        """Dispatch jobs the handler has just created together (``create_and_start_many``),
        in their order. Executors that can send several messages at once override this."""
        for job in jobs:
            self.enqueue_job(job)

    def check(self) -> list[CheckMessage]:
        """System-check messages about this executor's configuration."""
        return []


def transaction_outbox(using: str, send: Callable[..., object]) -> dict[int, Any] | None:
    """What the current transaction on ``using`` still has to dispatch, by job id: shared by
    the on-commit callbacks it registered as ``functools.partial(send, items, outbox)``. None
    in autocommit mode, where each dispatch happens at once.

    When one callback fails, Django drops the later ones, so the outbox names the jobs that
    will not be sent and must be failed. Found through the transaction's own callbacks, so a
    job started by another transaction's commit hook, or in another thread, gets its own. A job
    rolled back with a savepoint stays listed: failing it finds no row.
    """
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block:
        return None
    # Django keeps (savepoint ids, callback, robust) per callback.
    for entry in reversed(connection.run_on_commit):
        func = entry[1]
        if isinstance(func, functools.partial) and func.func == send:
            outbox: dict[int, Any] = func.args[1]
            return outbox
    return {}


def describe_ids(ids: list[int]) -> str:
    """``"ids 4 to 9"`` for a run of consecutive ids, else the ids themselves (a few of them)."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"ids {ids[0]} to {ids[-1]}"
    shown = ", ".join(str(job_id) for job_id in ids[:5])
    return f"ids {shown}" + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


@functools.cache
def get_executor() -> BaseExecutor:
    """The configured executor, built once per process (reset when settings change)."""
    path = ferry_settings.EXECUTOR
    try:
        executor_class = import_string(path)
    except ImportError as exc:
        raise TaskFerryImproperlyConfigured(
            f"TASK_FERRY['EXECUTOR'] = {path!r} cannot be imported: {exc}. "
            f"Install the matching extra (django-task-ferry[celery] or [django-tasks]) "
            f"or fix the dotted path."
        ) from exc
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
