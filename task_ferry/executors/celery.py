"""Runs jobs on Celery workers. The worker's task is ``task_ferry.run_job``; see
``task_ferry.tasks`` and docs/executors.md for delivery semantics and the beat schedule.

Dispatch waits for the surrounding transaction to commit, so a worker never looks for a job
row that is not visible yet, and a rolled-back ``create_and_start`` sends nothing. This module
imports before Django's apps are ready, so a project's celery.py can call ``beat_schedule()``.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import math
import os
import sys
import threading
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from django.core.checks import CheckMessage, Error
from django.core.checks import Warning as CheckWarning

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import DispatchError, TaskFerryImproperlyConfigured
from task_ferry.executors.base import (
    BaseExecutor,
    Outbox,
    WaitingQueue,
    describe_ids,
    describe_later,
    dispatch_on_commit,
)

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Connection, Producer

    from task_ferry.models import Job
    from task_ferry.registry import JobType

__all__ = [
    "CLEANUP_OLD_JOBS_TASK",
    "RUN_JOB_TASK",
    "SWEEP_STALE_JOBS_TASK",
    "CeleryExecutor",
    "beat_schedule",
    "get_celery_app",
]

logger = logging.getLogger("task_ferry")

# Stable task names: workers on other hosts, and messages already queued, rely on them.
RUN_JOB_TASK = "task_ferry.run_job"
CLEANUP_OLD_JOBS_TASK = "task_ferry.cleanup_old_jobs"
SWEEP_STALE_JOBS_TASK = "task_ferry.sweep_stale_jobs"


def run_job_task_id(job_id: int) -> str:
    """The Celery task id of a job's message: its job's id, then a UUID as Celery's own. Celery's
    log lines ("Task task_ferry.run_job[job-42-...] received", a WorkerLostError), Flower and
    ``celery inspect active`` then say which job a task runs, at no cost per job."""
    return f"job-{job_id}-{uuid.uuid4()}"


# Seconds any one broker operation of a dispatch may take.
BROKER_TIMEOUT = 2.0
TIMEOUT_OPTIONS: dict[str, dict[str, float]] = {
    "redis": {"socket_timeout": BROKER_TIMEOUT, "socket_connect_timeout": BROKER_TIMEOUT},
    "rediss": {"socket_timeout": BROKER_TIMEOUT, "socket_connect_timeout": BROKER_TIMEOUT},
    "amqp": {"read_timeout": BROKER_TIMEOUT, "write_timeout": BROKER_TIMEOUT},
    "pyamqp": {"read_timeout": BROKER_TIMEOUT, "write_timeout": BROKER_TIMEOUT},
}
# One reconnect after half a second rides out a broker restart; a dead broker fails the
# dispatch within about 2 * BROKER_TIMEOUT + 0.5 seconds.
PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0.5,
    "interval_step": 0.5,
    "interval_max": 0.5,
}


class Message(NamedTuple):
    """One job's ``run_job`` message, as the executor sends it."""

    job_id: int
    type_name: str
    queue: str
    #: Celery's hard time limit of the run, in seconds (``hard_time_limit()``); None: none of
    #: its own, the app's ``task_time_limit`` applies.
    time_limit: int | None


UNREACHABLE_MESSAGE = (
    "The job queue {queue!r} could not be reached, so this job was never started. Try again later."
)


def get_celery_app() -> Celery | None:
    """The project's Celery app, or None when the project created none.

    Celery's current app is thread-local: in a thread other than the one that created the app
    it is Celery's unconfigured fallback, so fall back to the one app the project created.
    """
    from celery import _state

    app: Celery = _state.get_current_app()
    if getattr(app, "set_as_current", False):
        return app
    # Celery's fallback app is the only one built with set_as_current=False.
    created = [a for a in _state._get_active_apps() if getattr(a, "set_as_current", False)]  # type: ignore[attr-defined]
    return created[0] if len(created) == 1 else None


class CeleryExecutor(BaseExecutor):
    """Sends each job to ``JobType.queue`` (or ``TASK_FERRY["CELERY_QUEUE"]``) as one
    ``task_ferry.run_job`` message, after the surrounding transaction commits.

    If the broker cannot be reached within a few seconds, the job is marked failed (if the
    database can still be reached) and ``DispatchError`` is raised: right away in autocommit
    mode, or from the end of the ``atomic()`` block that created the job (then every job of
    that block that was not sent is marked failed too).
    """

    supports_queues = True

    def __init__(self) -> None:
        # Per thread: the broker connection, its producer and the queues bound to it.
        self._local = threading.local()

    def enqueue(self, job_id: int) -> None:
        self.enqueue_jobs([self.job_of(job_id)])

    def enqueue_job(self, job: Job) -> None:
        self.enqueue_jobs([job])

    def enqueue_jobs(self, jobs: list[Job]) -> None:
        # The handler holds the jobs: their type gives the queue without a query. One callback
        # sends them all, in one round trip where kombu batches publishes.
        self._dispatch_on_commit(
            [self._message(job.pk, job.type) for job in jobs],
            {job.pk: job.created_at for job in jobs},
        )

    def _message(self, job_id: int, type_name: str) -> Message:
        from task_ferry.registry import job_type_registry

        job_type = job_type_registry.get(type_name)
        return Message(job_id, type_name, queue_of(job_type), hard_time_limit(job_type.time_limit))

    def queue_for(self, type_name: str) -> str:
        from task_ferry.registry import job_type_registry

        return queue_of(job_type_registry.get(type_name))

    def waiting_queue(self, type_name: str) -> WaitingQueue:
        queue = self.queue_for(type_name)
        app = get_celery_app()
        worker = f"celery -A {app.main} worker" if app is not None and app.main else "celery worker"
        return WaitingQueue(
            name=f"the Celery queue {queue!r}", worker_command=f"{worker} -Q {queue}"
        )

    def _dispatch_on_commit(
        self, messages: list[Message], created_at: dict[int, datetime.datetime]
    ) -> None:
        from task_ferry.models import jobs_database

        dispatch_on_commit(jobs_database(), self._send, messages, created_at)

    def _send(self, messages: list[Message], outbox: Outbox[Message]) -> None:
        outbox.sending(messages)
        app = get_celery_app()
        if app is None:
            self._fail_all(messages, outbox, "no Celery app is configured")
            raise TaskFerryImproperlyConfigured(NO_APP_MESSAGE)
        connection, producer = self._connection(app)
        try:
            with publish_batch(producer, len(messages)):
                for job_id, type_name, queue, time_limit in messages:
                    app.send_task(
                        RUN_JOB_TASK,
                        args=(job_id, type_name),
                        task_id=run_job_task_id(job_id),
                        queue=self._bound_queues(producer).get(queue, queue),
                        producer=producer,
                        # What Celery's saferepr() of the arguments would give, without its cost.
                        argsrepr=repr((job_id, type_name)),
                        kwargsrepr="{}",
                        time_limit=time_limit,
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                        ignore_result=True,
                    )
        except Exception as exc:
            # kombu raises OperationalError, but transports leak their own errors too.
            self._drop_connection()
            raise self._dispatch_failed(messages, outbox, connection, exc) from exc
        # Once sent, the job is dispatched: nothing here may fail it.
        try:
            self._bind_queues(app, producer, {message.queue for message in messages})
        except Exception:
            logger.debug("Could not keep Celery's queues bound", exc_info=True)
        keep_one_redis_client(producer.channel)

    def _dispatch_failed(
        self,
        messages: list[Message],
        outbox: Outbox[Message],
        connection: Connection,
        exc: Exception,
    ) -> DispatchError:
        """Fail the jobs of a send that raised, and those of the same commit that Django will
        not send after it; the error for the caller. In a batch, some messages may have
        reached the broker: failing their jobs is still safe, as a worker only runs a job that
        is pending."""
        reason = describe_error(exc)
        failed, later = self._fail_all(messages, outbox, reason)
        job_id, queue = messages[0].job_id, messages[0].queue
        if len(messages) == 1:
            what = f"Job {job_id} could not"
            outcome = (
                "The job was marked failed."
                if failed
                else "The job could not be marked failed (see the log): it stays pending until "
                "the stale-job sweep fails it."
            )
        else:
            ids = describe_ids([message.job_id for message in messages])
            what = f"{len(messages)} jobs ({ids}) could not all"
            outcome = (
                "Each of them that had not started was marked failed."
                if failed
                else "None of them could be marked failed (see the log): those that had not "
                "started stay pending until the stale-job sweep fails them."
            )
        if later:
            outcome += " " + describe_later(later, "it" if len(messages) == 1 else "them")
        return DispatchError(
            f"{what} be sent to the Celery queue {queue!r} at {connection.as_uri()}: "
            f"{reason.rstrip('.')}. {outcome} Check the broker URL and that the broker is running."
        )

    def _connection(self, app: Celery) -> tuple[Connection, Producer]:
        """This thread's broker connection, with timeouts on every socket operation, and its
        producer (not connected until the first send).

        Celery's own producer pool has none on Redis, where a hung broker would block the
        request forever. Reusing the connection also declares each queue only once, and
        reusing the producer saves building one per message.
        """
        cached = getattr(self._local, "connection", None)
        if cached is not None and cached[0] is app and cached[1] == os.getpid():
            return cast("tuple[Connection, Producer]", cached[2:])
        self._drop_connection()
        connection: Connection = app.connection_for_write(connect_timeout=BROKER_TIMEOUT)
        options = TIMEOUT_OPTIONS.get(connection.transport_cls, {})
        connection.transport_options = {**options, **(connection.transport_options or {})}
        producer: Producer = app.amqp.Producer(connection, auto_declare=False)
        self._local.connection = (app, os.getpid(), connection, producer)
        return connection, producer

    def _bound_queues(self, producer: Producer) -> dict[str, Any]:
        """Celery's queues this thread has sent to, by name, bound to the producer's channel;
        empty before the first send and after a reconnect. Given a queue's name, kombu binds a
        copy of the queue to the channel for every message, and drops it: a tenth of
        ``create_and_start``'s CPU time."""
        channel, queues = getattr(self._local, "queues", None) or (None, {})
        # Only a thread that has sent holds bound queues, so its producer's channel is open.
        return queues if queues and channel is producer.channel else {}

    def _bind_queues(self, app: Celery, producer: Producer, names: set[str]) -> None:
        """After a send, when the producer's channel is open: bind the queues it went to."""
        channel = producer.channel
        if channel is None:
            return
        queues = self._bound_queues(producer)
        for name in names - queues.keys():
            queues[name] = app.amqp.queues[name].bind(channel)
        self._local.queues = (channel, queues)

    def _drop_connection(self) -> None:
        cached = getattr(self._local, "connection", None)
        self._local.connection = None
        self._local.queues = None
        if cached is not None and cached[1] == os.getpid():
            with contextlib.suppress(Exception):
                cached[2].release()

    def _fail_all(
        self, messages: list[Message], outbox: Outbox[Message], reason: str
    ) -> tuple[list[int], list[int]]:
        """Fail the jobs of a send that cannot happen, and those of the same transaction that
        Django will not send after it (its later callbacks are dropped once one raises).
        Returns the ids of each that were marked failed."""
        later = outbox.take_rest()
        failed = [
            message.job_id
            for message in messages
            if self._fail_unsent(message.job_id, None, message.queue, reason)
        ]
        return failed, [
            message.job_id
            for message, created_at in later
            if self._fail_unsent(message.job_id, created_at, message.queue, reason)
        ]

    @staticmethod
    def _fail_unsent(
        job_id: int, created_at: datetime.datetime | None, queue: str, reason: str
    ) -> bool:
        """Mark the job failed; False if it was not (it left pending, was rolled back, or the
        database is down too: the stale-job sweep fails it after PENDING_TIMEOUT)."""
        from task_ferry.handler import JobHandler

        try:
            return JobHandler.fail_undispatched(
                job_id,
                created_at=created_at,
                error=f"Could not dispatch to Celery queue {queue!r}: {reason}",
                human_readable_error=UNREACHABLE_MESSAGE.format(queue=queue),
            )
        except Exception:
            # The caller's error must stay the broker's, which is what to fix first.
            logger.exception("Job %s: could not mark the unsent job failed", job_id)
            return False

    def check(self) -> list[CheckMessage]:
        try:
            import celery  # noqa: F401
        except ImportError:
            return [
                Error(
                    "TASK_FERRY['EXECUTOR'] is the CeleryExecutor, but Celery is not installed.",
                    hint="pip install 'django-task-ferry[celery]'",
                    id="task_ferry.E010",
                )
            ]
        messages: list[CheckMessage] = []
        queue = ferry_settings.CELERY_QUEUE
        if not (isinstance(queue, str) and queue):
            # Jobs would go to a queue named str(queue), "None" say, that no worker consumes.
            messages.append(
                Error(
                    f"TASK_FERRY['CELERY_QUEUE'] must be the name of a Celery queue (a non-empty "
                    f"str), got {queue!r}.",
                    hint="Name the queue your workers consume (celery worker -Q), or remove it "
                    'to use "default".',
                    id="task_ferry.E013",
                )
            )
        app = get_celery_app()
        if app is None:
            return [*messages, Error(NO_APP_MESSAGE, hint=NO_APP_HINT, id="task_ferry.E010")]
        # Environment variables included: CELERY_BROKER_WRITE_URL, then CELERY_BROKER_URL.
        if not app.conf.broker_write_url:
            messages.append(
                CheckWarning(NO_BROKER_MESSAGE, hint=NO_BROKER_HINT, id="task_ferry.W011")
            )
        if app.conf.task_always_eager:
            # Jobs are sent by name (send_task), which Celery never runs eagerly.
            messages.append(
                CheckWarning(EAGER_IGNORED_MESSAGE, hint=EAGER_IGNORED_HINT, id="task_ferry.W012")
            )
        return [*messages, *priorities_ignored()]


def queue_of(job_type: JobType) -> str:
    """The Celery queue of ``job_type``'s jobs: its own, or ``TASK_FERRY["CELERY_QUEUE"]``."""
    return job_type.queue or str(ferry_settings.CELERY_QUEUE)


def hard_time_limit(time_limit: float | None) -> int | None:
    """Celery's hard time limit for a run of a type with this ``time_limit``: the limit plus
    ``TASK_FERRY["CELERY_TIME_LIMIT_GRACE"]``, rounded up to whole seconds. The cooperative
    stop comes at the run's first tick past its limit; a run that stops ticking (blocked in a
    query, a C call) is killed with its pool process once the grace is over too, and
    ``task_ferry.tasks.RunJobRequest`` fails its job."""
    grace = ferry_settings.CELERY_TIME_LIMIT_GRACE
    if time_limit is None or grace is None:
        return None
    return math.ceil(time_limit + grace)


def priorities_ignored() -> list[CheckMessage]:
    """task_ferry.W013 for each job type that sets a priority: Celery's brokers each read a
    message's priority their own way (RabbitMQ only on queues declared with
    ``x-max-priority``, higher first; Redis only with ``priority_steps``, lower first), so the
    executor sends none, and routing is how a type's jobs overtake others."""
    from task_ferry.registry import job_type_registry

    return [
        CheckWarning(
            f"Job type {job_type.type!r} sets priority {job_type.priority!r}, which the "
            f"CeleryExecutor does not send: Celery's brokers read priorities each their own "
            f"way, or not at all. Its jobs wait in their queue in the order they were created.",
            hint=(
                f"Give the type a queue of its own ({type(job_type).__qualname__}.queue) and "
                f"start workers for it (celery worker -Q <queue>), so that its jobs never wait "
                f"behind others; then remove the priority."
            ),
            obj=type(job_type),
            id="task_ferry.W013",
        )
        for job_type in job_type_registry.all()
        if job_type.priority
    ]


def log_queues_served(consumer: Any) -> None:
    """At a worker's start (``worker_ready``, whose sender is its consumer), say which of the
    queues jobs go to it does not consume: a WARNING when it was started without ``-Q`` (it
    consumes Celery's default queue alone, and jobs would wait unseen), INFO otherwise (workers
    dedicated to some queues are a legitimate setup). The queues of task_ferry's beat entries
    (``beat_schedule()``) count too: with none of their workers, the stale-job sweep and the
    cleanup never run. Django's checks cannot see a worker's ``-Q``."""
    from task_ferry.executors.base import get_executor
    from task_ferry.registry import job_type_registry

    executor = get_executor()
    if not isinstance(executor, CeleryExecutor):
        return
    job_queues = sorted({executor.queue_for(job_type.type) for job_type in job_type_registry})
    maintenance = [q for q in maintenance_queues(consumer.app) if q not in job_queues]
    consumed = consumed_queues(consumer)
    needed = [*job_queues, *maintenance]
    served = [queue for queue in needed if queue in consumed]
    unserved = [queue for queue in needed if queue not in consumed]
    if not unserved:
        return
    sent_to = f"task_ferry sends jobs to {', '.join(job_queues)}" + (
        f" and its maintenance tasks to {', '.join(maintenance)}" if maintenance else ""
    )
    if served:
        logger.info(
            "This worker takes the tasks sent to the queue(s) %s; those sent to %s need a worker "
            "started with -Q %s.",
            ", ".join(served),
            ", ".join(unserved),
            ",".join(unserved),
        )
        return
    if consumed != [consumer.app.conf.task_default_queue]:
        # Started with -Q for other queues: a worker dedicated to the project's other tasks.
        logger.info(
            "This worker takes no jobs: it consumes the queue(s) %s, and %s.",
            ", ".join(consumed) or "(none)",
            sent_to,
        )
        return
    # Started without -Q, surely by mistake. The queue it consumes kept: Celery's default may
    # hold the project's other tasks, which a worker started with only the jobs' queues would
    # no longer run.
    # The maintenance tasks get a worker of their own: behind long jobs, the sweep runs late.
    app_name = app_argument(sys.argv, consumer.app.main or "proj")
    queues = [*consumed, *job_queues]
    own_worker = (
        f"; and give {','.join(maintenance)} a worker of its own: celery -A {app_name} worker "
        f"-Q {','.join(maintenance)} --concurrency 1"
        if maintenance
        else ""
    )
    logger.warning(
        "This worker consumes the queue(s) %s, and %s: it will run none of them, and they stay "
        "pending until a worker consumes their queue. Start it with -Q: celery -A %s worker -Q "
        "%s%s",
        ", ".join(consumed) or "(none)",
        sent_to,
        app_name,
        ",".join(queues),
        own_worker,
    )


def log_worker_checks() -> None:
    """At a worker's start (``worker_ready``): log what task_ferry's system checks find in the
    worker's settings, W014 included (see ``log_checks_at_start``). Skipped where
    ``CELERY_SKIP_CHECKS`` is set, as Celery skips Django's checks then."""
    from task_ferry.checks import log_checks_at_start

    if os.environ.get("CELERY_SKIP_CHECKS"):
        return
    log_checks_at_start(worker_executor_warnings)


def worker_executor_warnings() -> list[CheckMessage]:
    """task_ferry.W014 where the worker's settings run jobs inline (the ImmediateExecutor, the
    default): web processes with the same settings send no job to Celery."""
    from task_ferry.executors.base import get_executor

    try:
        executor = get_executor()
    except Exception:
        return []  # E001 reports it.
    if executor.runs_out_of_process:
        return []
    path = ferry_settings.EXECUTOR
    default = "" if "EXECUTOR" in ferry_settings.user_settings else " (the default)"
    return [
        CheckWarning(
            f"This Celery worker runs task_ferry's tasks, but its settings' "
            f"TASK_FERRY['EXECUTOR'] is {path!r}{default}, which runs each job inline, in the "
            f"process that starts it. If the web processes run with these same settings, they "
            f"run every job inside the request that starts it and send none to Celery: no job "
            f"reaches this worker.",
            hint='Set TASK_FERRY["EXECUTOR"] = "task_ferry.executors.celery.CeleryExecutor" in '
            "the settings of the web processes and of the workers alike. If this worker is "
            "only for the project's other tasks, silence this with SILENCED_SYSTEM_CHECKS = "
            '["task_ferry.W014"].',
            id="task_ferry.W014",
        )
    ]


def maintenance_queues(app: Any) -> list[str]:
    """The queues the app's beat entries send task_ferry's cleanup and sweep to, by their
    ``options`` (what ``beat_schedule()`` sets), in entry order."""
    schedule = getattr(app.conf, "beat_schedule", None) or {}
    queues: list[str] = []
    for entry in schedule.values():
        if not isinstance(entry, dict):
            continue
        if entry.get("task") not in (CLEANUP_OLD_JOBS_TASK, SWEEP_STALE_JOBS_TASK):
            continue
        queue = (entry.get("options") or {}).get("queue")
        if isinstance(queue, str) and queue not in queues:
            queues.append(queue)
    return queues


def app_argument(argv: list[str], default: str) -> str:
    """The ``-A``/``--app`` a worker was started with, from its command line ``argv``; else
    ``default`` (the app's name, which ``-A`` finds in the usual ``<name>/celery.py``)."""
    for position, argument in enumerate(argv):
        if argument in ("-A", "--app") and position + 1 < len(argv):
            return argv[position + 1]
        if argument.startswith("--app="):
            return argument.removeprefix("--app=")
        if argument.startswith("-A") and len(argument) > 2:
            return argument.removeprefix("-A")
    return default


def consumed_queues(consumer: Any) -> list[str]:
    """Names of the queues a worker's consumer takes tasks from (``-Q``, or Celery's default
    queue, ``celery``, without it)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is not None:
        return [queue.name for queue in task_consumer.queues]
    return list(consumer.app.amqp.queues.consume_from)


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` of a send's error, with the error that caused it (a failed kombu
    batch says only that delivery is uncertain; its cause says why). A cause whose message the
    error repeats (kombu re-raising redis-py's ``ConnectionError`` as ``OperationalError``)
    is left out."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is None:
        return text
    cause_message = str(cause).strip()
    if cause_message and cause_message in text:
        return text
    return f"{text} ({type(cause).__name__}: {cause})"


def publish_batch(producer: Producer, count: int) -> contextlib.AbstractContextManager[Any]:
    """A context in which the producer's publishes wait, to reach the broker together when it
    ends (kombu 5.7's ``Producer.batch()``; on Redis, one pipeline). Its own publishes for a
    single message, a transport that cannot batch, or an older kombu.

    kombu sends a long batch a thousand commands at a time (on Redis, a message is one). A
    batch that fails raises once for all its messages, and some of them may have reached the
    broker: the caller fails every job of it that has not started.
    """
    batch = getattr(producer, "batch", None)
    if count < 2 or batch is None:
        return contextlib.nullcontext()
    context: contextlib.AbstractContextManager[Any] = batch()
    return context


def keep_one_redis_client(channel: Any) -> None:
    """Have a channel of kombu's Redis transport publish through one redis-py client.

    The transport builds a new client for every message it sends, and building one copies
    redis-py's table of response callbacks: in isolation, a third of the CPU time of a
    ``send_task``. The client only wraps the channel's connection pool, so one serves every
    message of the channel. Other transports, and a kombu whose channel has no
    ``_create_client(asynchronous=...)``, are left as they are.
    """
    create = getattr(channel, "_create_client", None)
    if create is None or getattr(create, "keeps_one_client", False):
        return
    try:
        if "asynchronous" not in inspect.signature(create).parameters:
            return
        client = create()
    except Exception:
        logger.debug("kombu's Redis channel keeps its client per message", exc_info=True)
        return

    def create_client(*args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("asynchronous"):
            return create(*args, **kwargs)
        return client

    create_client.keeps_one_client = True  # type: ignore[attr-defined]
    channel._create_client = create_client


NO_APP_MESSAGE = "TASK_FERRY['EXECUTOR'] is the CeleryExecutor, but no Celery app is configured."
NO_BROKER_MESSAGE = (
    "The Celery app has no broker URL, so jobs go to Celery's default broker, "
    "amqp://guest@localhost//."
)
NO_BROKER_HINT = (
    'Set CELERY_BROKER_URL in your settings (e.g. "redis://127.0.0.1:6379/1"; celery.py reads '
    'it with config_from_object("django.conf:settings", namespace="CELERY")), or pass broker= '
    "to Celery()."
)
EAGER_IGNORED_MESSAGE = (
    "The Celery app has task_always_eager set, which does not apply to task_ferry's jobs: the "
    "CeleryExecutor still sends them to the broker, and they wait there for a worker."
)
EAGER_IGNORED_HINT = (
    'To run jobs inline (tests, development), set TASK_FERRY["EXECUTOR"] to '
    '"task_ferry.executors.immediate.ImmediateExecutor".'
)
NO_APP_HINT = (
    "Create your Celery app in <project>/celery.py and import it in <project>/__init__.py "
    "(see docs/executors.md), so it exists once Django has started."
)


def beat_schedule(
    *,
    cleanup_every: Any = None,
    sweep_every: float | datetime.timedelta = 60,
    queue: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Celery beat entries for ``cleanup_old_jobs`` (daily at 03:00 by default) and the
    stale-job sweep (every minute). Merge them into ``app.conf.beat_schedule``."""
    from celery.schedules import crontab

    options = {"queue": queue or str(ferry_settings.CELERY_QUEUE)}
    return {
        CLEANUP_OLD_JOBS_TASK: {
            "task": CLEANUP_OLD_JOBS_TASK,
            "schedule": crontab(minute=0, hour=3) if cleanup_every is None else cleanup_every,
            "options": options,
        },
        SWEEP_STALE_JOBS_TASK: {
            "task": SWEEP_STALE_JOBS_TASK,
            "schedule": sweep_every,
            "options": options,
        },
    }
