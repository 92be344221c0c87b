"""System checks. Ids are stable; docs/checks.md lists them all."""

from __future__ import annotations

import datetime
import difflib
import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import import_module
from importlib.util import find_spec
from types import ModuleType
from typing import TYPE_CHECKING, Any

from django.apps import AppConfig, apps
from django.core.checks import ERROR, CheckMessage, Error, Tags, register
from django.core.checks import Warning as CheckWarning
from django.db import DatabaseError
from django.urls import URLResolver, get_resolver
from django.utils import timezone

from task_ferry.conf import DEFAULTS, SETTINGS_NAME, ferry_settings

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models.expressions import Combinable

    from task_ferry.models import Job, JobQuerySet
    from task_ferry.registry import JobType, JobTypeRegistry

logger = logging.getLogger("task_ferry")


@register()
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    # By repr: a key may be no str at all, and a trailing space must show.
    unknown = sorted(set(ferry_settings.user_settings) - set(DEFAULTS), key=repr)
    if unknown:
        messages.append(
            Error(
                f"TASK_FERRY has unknown key(s): {', '.join(map(describe_unknown_key, unknown))}.",
                hint=f"Valid keys are: {', '.join(sorted(DEFAULTS))}.",
                id="task_ferry.E002",
            )
        )
    misspelt = misspelt_settings_name()
    if misspelt is not None:
        messages.append(
            CheckWarning(
                f"There is no TASK_FERRY setting, but there is {misspelt}: task_ferry reads "
                f"only TASK_FERRY, so it runs with its defaults (the ImmediateExecutor, which "
                f"runs each job inside the request that starts it).",
                hint=f"Rename {misspelt} to TASK_FERRY.",
                id="task_ferry.W008",
            )
        )
    refused = set()
    for name, minimum, maximum, kind in NUMBERS:
        value = getattr(ferry_settings, name)
        if value is None and name in MAY_BE_NONE:
            continue
        if not is_number(value, kind) or not minimum <= value <= maximum:
            refused.add(name)
            what = "a whole number" if kind is int else "a number"
            none = " or None" if name in MAY_BE_NONE else ""
            messages.append(
                Error(
                    f"TASK_FERRY[{name!r}] must be {what} from {minimum:g} to {maximum:.0f}{none}, "
                    f"got {value!r}.",
                    hint=f"Remove it to use the default, {DEFAULTS[name]!r}.",
                    id="task_ferry.E003",
                )
            )
    limit = ferry_settings.MAX_JOBS_PER_USER_PER_TYPE
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        messages.append(
            Error(
                f"TASK_FERRY['MAX_JOBS_PER_USER_PER_TYPE'] must be a positive int or None, "
                f"got {limit!r}.",
                hint="Use None for no limit.",
                id="task_ferry.E004",
            )
        )
    heartbeat_refused = refused & {"HEARTBEAT_TIMEOUT", "HEARTBEAT_INTERVAL"}
    if (
        not heartbeat_refused
        and ferry_settings.HEARTBEAT_TIMEOUT <= ferry_settings.HEARTBEAT_INTERVAL
    ):
        messages.append(
            Error(
                "TASK_FERRY['HEARTBEAT_TIMEOUT'] must be larger than HEARTBEAT_INTERVAL, or "
                "every running job would look lost.",
                hint="Make HEARTBEAT_TIMEOUT at least three times HEARTBEAT_INTERVAL.",
                id="task_ferry.E005",
            )
        )
    if not refused & {"PROGRESS_CACHE_TIMEOUT", "PUBLISH_INTERVAL"}:
        messages.extend(check_snapshot_lifetime())
    messages.extend(check_permission_class())
    return messages


def misspelt_settings_name() -> str | None:
    """A setting named nearly ``TASK_FERRY`` (``TASK_FERY``, ``TASKFERRY``), when there is no
    ``TASK_FERRY``: its keys would be ignored without a word."""
    from django.conf import settings

    if getattr(settings, SETTINGS_NAME, None) is not None:
        return None
    names = [name for name in dir(settings) if name.isupper() and name != SETTINGS_NAME]
    close = difflib.get_close_matches(SETTINGS_NAME, names, n=1, cutoff=0.8)
    return close[0] if close else None


def describe_unknown_key(key: object) -> str:
    """``'EXECUTER' (did you mean 'EXECUTOR'?)``, or the key's repr alone."""
    if isinstance(key, str):
        close = difflib.get_close_matches(key.strip().upper(), DEFAULTS, n=1, cutoff=0.8)
        if close:
            return f"{key!r} (did you mean {close[0]!r}?)"
    return repr(key)


# Numeric settings: name, smallest and largest value, and int for whole numbers only.
NUMBERS: tuple[tuple[str, float, float, type], ...] = (
    # Redis takes whole seconds for a key's lifetime.
    ("PROGRESS_CACHE_TIMEOUT", 1, 10 * 365 * 86400, int),
    # A cutoff further back than the calendar goes cannot be computed.
    ("JOB_EXPIRY_DAYS", 0, 36500, float),
    ("PUBLISH_INTERVAL", 0.001, 3600, float),
    ("HEARTBEAT_INTERVAL", 0.1, 86400, float),
    ("HEARTBEAT_TIMEOUT", 1, 7 * 86400, float),
    ("PENDING_TIMEOUT", 1, 365 * 86400, float),
    ("SSE_KEEPALIVE", 0.1, 3600, float),
    ("SSE_MAX_DURATION", 1, 86400, float),
    ("SSE_MAX_STREAMS_PER_USER", 0, 1_000_000, int),
    ("CELERY_TIME_LIMIT_GRACE", 1, 86400, float),
)
MAY_BE_NONE = {"PENDING_TIMEOUT", "SSE_MAX_STREAMS_PER_USER", "CELERY_TIME_LIMIT_GRACE"}


def is_number(value: object, kind: type) -> bool:
    """A finite int (or, unless ``kind`` is int, float); never a bool."""
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def check_snapshot_lifetime() -> list[CheckMessage]:
    """W005 where a running job's snapshot expires between two publications."""
    # The monitor writes a running job's snapshot at the first PUBLISH_INTERVAL after its
    # numbers change or after it turns half a PROGRESS_CACHE_TIMEOUT old (monitor._publish).
    # An interval over half the timeout thus rewrites it at every interval; a shorter one, at
    # the first interval past half the timeout, less than a timeout after the last write. Only
    # an interval of a whole timeout or more lets the snapshot expire before the next write.
    timeout = ferry_settings.PROGRESS_CACHE_TIMEOUT
    interval = ferry_settings.PUBLISH_INTERVAL
    if interval < timeout:
        return []
    # Twice the interval and two seconds: each snapshot is rewritten at least a second before
    # it expires, on stores that count expiry in whole seconds too (memcached, a database cache).
    suggested = math.ceil(2 * interval) + 2
    return [
        CheckWarning(
            f"TASK_FERRY['PROGRESS_CACHE_TIMEOUT'] ({timeout} s) is not longer than "
            f"PUBLISH_INTERVAL ({interval:g} s): a running job's snapshot expires before the "
            f"monitor publishes it again, and polls in between answer from the job's row, "
            f"without its progress.",
            hint=f"Set PROGRESS_CACHE_TIMEOUT to {suggested} or more (twice PUBLISH_INTERVAL "
            f"and two seconds), or lower PUBLISH_INTERVAL (the default is "
            f"{DEFAULTS['PUBLISH_INTERVAL']}).",
            id="task_ferry.W005",
        )
    ]


def not_a_dotted_path(name: str, value: object, *, example: str, without_it: str, id: str) -> Error:
    """E006 and E008: a setting that names a class by its dotted path holds something else
    (the class itself, say)."""
    return Error(
        f"TASK_FERRY[{name!r}] must be a dotted path (a string), got {value!r}.",
        hint=f'For example "{example}", or remove it to {without_it}.',
        id=id,
    )


def check_permission_class() -> list[CheckMessage]:
    from django.utils.module_loading import import_string

    from task_ferry.api.permissions import IsJobOwner

    path = ferry_settings.API_PERMISSION_CLASS
    if not isinstance(path, str):
        return [
            not_a_dotted_path(
                "API_PERMISSION_CLASS",
                path,
                example="task_ferry.api.permissions.IsJobOwnerOrStaff",
                without_it="use IsJobOwner",
                id="task_ferry.E008",
            )
        ]
    try:
        permission_class = import_string(path)
    except (ImportError, TypeError, ValueError) as exc:
        return [
            Error(
                f"TASK_FERRY['API_PERMISSION_CLASS'] = {path!r} cannot be imported: {exc}.",
                hint="Fix the dotted path, e.g. task_ferry.api.permissions.IsJobOwnerOrStaff, "
                "or remove it to use IsJobOwner.",
                id="task_ferry.E008",
            )
        ]
    if not (isinstance(permission_class, type) and issubclass(permission_class, IsJobOwner)):
        # The API asks it which jobs a user sees and may cancel: hooks only IsJobOwner has.
        return [
            Error(
                f"TASK_FERRY['API_PERMISSION_CLASS'] = {path!r} is not a subclass of "
                "task_ferry.api.permissions.IsJobOwner: every API request would fail.",
                hint="Subclass IsJobOwner (or IsJobOwnerOrStaff) and override its hooks; see "
                "docs/api.md.",
                id="task_ferry.E041",
            )
        ]
    if permission_class.has_object_permission is not IsJobOwner.has_object_permission:
        # Its rule would be silently skipped: a hole, not a style issue.
        return [
            Error(
                f"TASK_FERRY['API_PERMISSION_CLASS'] = {path!r} overrides "
                "has_object_permission(), which the job API never calls: details and events "
                "are answered from the progress store, without a Job object.",
                hint="Decide who sees which jobs in sees_all_jobs(), or in visible_jobs() and "
                "can_view() together, and who cancels in can_cancel(); see docs/api.md.",
                id="task_ferry.E040",
            )
        ]
    return []


# Where django-tasks kept its database backend before it moved to django-tasks-db.
OBSOLETE_DATABASE_BACKEND = "django_tasks.backends.database.DatabaseBackend"
DATABASE_BACKEND = "django_tasks_db.DatabaseBackend"
# Database backend paths that do not exist, and why: the old one, and the one a Django 6
# project guesses from the old one (Django took the tasks API in without that backend).
MISPLACED_DATABASE_BACKENDS = {
    OBSOLETE_DATABASE_BACKEND: "which no longer exists: the database backend moved to the "
    "django-tasks-db package",
    "django.tasks.backends.database.DatabaseBackend": "which does not exist: Django's "
    "django.tasks has no database backend (only ImmediateBackend and DummyBackend); it is in "
    "the django-tasks-db package",
}


def misplaced_tasks_backend_error(alias: str, path: str = OBSOLETE_DATABASE_BACKEND) -> Error:
    """E022: ``TASKS[alias]`` names a database backend at ``path``, one of
    ``MISPLACED_DATABASE_BACKENDS``."""
    return Error(
        f"TASKS[{alias!r}]['BACKEND'] is {path!r}, {MISPLACED_DATABASE_BACKENDS[path]}.",
        hint=f'Use "BACKEND": "{DATABASE_BACKEND}", add "django_tasks_db" to INSTALLED_APPS, '
        f"run migrate, and run workers with manage.py db_worker.",
        id="task_ferry.E022",
    )


def misplaced_database_backend(backend: object) -> str | None:
    """``backend`` if it is one of ``MISPLACED_DATABASE_BACKENDS``, else None."""
    if isinstance(backend, str) and backend in MISPLACED_DATABASE_BACKENDS:
        return backend
    return None


def refuse_misplaced_tasks_backend() -> None:
    """Raise E022 as ``TaskFerryImproperlyConfigured`` at startup where ``TASKS`` names a
    database backend path of ``MISPLACED_DATABASE_BACKENDS``, it does not import, and the
    system check of ``django.tasks`` (Django 6's own, or the backport's when "django_tasks" is
    in INSTALLED_APPS) would stop ``check``, ``migrate`` and ``runserver`` on it first: its
    ``InvalidTaskBackend`` says only that the module is missing, and E022 would never be
    shown. Elsewhere E022 is reported as a check."""
    from django.conf import settings
    from django.utils.module_loading import import_string

    from task_ferry.exceptions import TaskFerryImproperlyConfigured

    tasks = getattr(settings, "TASKS", None)
    if not isinstance(tasks, Mapping):
        return
    misplaced = [
        (alias, path)
        for alias, params in tasks.items()
        if isinstance(params, Mapping)
        and (path := misplaced_database_backend(params.get("BACKEND"))) is not None
    ]
    if not misplaced:
        return
    if find_spec("django.tasks") is None and not apps.is_installed("django_tasks"):
        return
    for alias, path in misplaced:
        try:
            import_string(path)
        except ImportError:
            error = misplaced_tasks_backend_error(alias, path)
            raise TaskFerryImproperlyConfigured(
                f"({error.id}) {error.msg}\n\tHINT: {error.hint}"
            ) from None


@register()
def check_executor(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    from django.utils.module_loading import import_string

    from task_ferry.executors.base import check_executor as run_check
    from task_ferry.executors.base import describe_import_error

    path = ferry_settings.EXECUTOR
    if not isinstance(path, str):
        return [
            Error(
                f"TASK_FERRY['EXECUTOR'] must be a dotted path (a string), got {path!r}.",
                hint='For example "task_ferry.executors.celery.CeleryExecutor".',
                id="task_ferry.E001",
            )
        ]
    try:
        import_string(path)
    except ImportError as exc:
        message, hint = describe_import_error(path, exc)
        return [Error(message, hint=hint, id="task_ferry.E001")]
    return run_check()


@register()
def check_store(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    from django.utils.module_loading import import_string

    from task_ferry.stores.base import ProgressStore, default_store_path, get_store

    configured = ferry_settings.PROGRESS_STORE
    # Unlike API_PERMISSION_CLASS's, an empty value is the default: REDIS_URL chooses.
    if configured and not isinstance(configured, str):
        return [
            not_a_dotted_path(
                "PROGRESS_STORE",
                configured,
                example="task_ferry.stores.redis.RedisProgressStore",
                without_it="let REDIS_URL choose",
                id="task_ferry.E006",
            )
        ]
    path = default_store_path()
    try:
        store_class = import_string(path)
    except (ImportError, TypeError, ValueError) as exc:
        return [
            Error(
                f"The progress store {path!r} cannot be imported: {exc}.",
                hint="Fix TASK_FERRY['PROGRESS_STORE'] or remove it.",
                id="task_ferry.E006",
            )
        ]
    if not (inspect.isclass(store_class) and issubclass(store_class, ProgressStore)):
        return [
            Error(
                f"The progress store {path!r} is not a ProgressStore subclass.",
                hint="Fix TASK_FERRY['PROGRESS_STORE'] or remove it.",
                id="task_ferry.E006",
            )
        ]
    try:
        store = get_store()
    except Exception as exc:
        # A Redis URL without a scheme, say: every job and poll would fail the same way.
        return [
            Error(
                f"The progress store {path!r} cannot be created: {exc}",
                hint="Fix TASK_FERRY['REDIS_URL'] (e.g. redis://127.0.0.1:6379/0) or the "
                "store's settings.",
                id="task_ferry.E006",
            )
        ]
    return store.check()


@register(Tags.database)
def check_cache_table(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """W006: the cache store's cache is a ``DatabaseCache`` whose table was never created.
    Every snapshot and cancel request would fail, logged in the worker, and ``check`` said
    nothing. A database check, so ``migrate`` (and ``check --database``) reports it."""
    from django.core.cache.backends.db import DatabaseCache
    from django.db import connections, router

    from task_ferry.stores.base import get_store
    from task_ferry.stores.cache import CacheProgressStore

    try:
        store = get_store()
    except Exception:
        return []  # E006 reports it.
    if not isinstance(store, CacheProgressStore) or not store.is_configured():
        return []  # E009 reports a missing alias.
    cache = store.cache
    if not isinstance(cache, DatabaseCache):
        return []
    alias = router.db_for_write(cache.cache_model_class)
    if not databases or alias not in databases:
        return []
    table = cache.cache_model_class._meta.db_table
    try:
        tables = connections[alias].introspection.table_names()
    except DatabaseError:
        return []  # An unreachable database is Django's to report.
    if table in tables:
        return []
    return [
        CheckWarning(
            f"The progress store is the cache {store.alias!r}, a DatabaseCache whose table "
            f"{table!r} does not exist in DATABASES[{alias!r}]: every progress write "
            f"and cancel request would fail, and pollers see a job only once it ends.",
            hint="Run python manage.py createcachetable.",
            id="task_ferry.W006",
        )
    ]


# How far past HEARTBEAT_TIMEOUT (or PENDING_TIMEOUT) a job the sweep fails may stay unfailed
# before that says no sweep runs. The sweep fails such a job at its next round: within a minute
# on the documented schedules (cron, beat's 60 s, --interval 60). Ten minutes leave room for
# any schedule up to that and for rounds lost to a database restart or a deploy.
SWEEP_GRACE = datetime.timedelta(minutes=10)


@register(Tags.database)
def check_sweep_runs(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """W007: jobs the stale-job sweep should have failed long ago are still started or
    pending, so nothing runs it. A database check: it counts jobs, so ``check --database``
    (and ``migrate``) reports it, a plain ``check`` does not."""
    from django.db import router

    from task_ferry.models import Job

    if not databases or router.db_for_read(Job) not in databases:
        return []
    try:
        warning = unswept_jobs_warning()
    except DatabaseError:
        return []  # An unreachable database, or tables not migrated yet: Django's to report.
    return [] if warning is None else [warning]


def unswept_jobs_warning() -> CheckMessage | None:
    """W007's warning where started jobs have had no heartbeat for over HEARTBEAT_TIMEOUT plus
    SWEEP_GRACE, or pending jobs have waited over PENDING_TIMEOUT plus SWEEP_GRACE; None
    otherwise. ``task_ferry_jobs`` says it too, after its listing."""
    from django.db import router, transaction
    from django.db.models import F, OuterRef, Subquery
    from django.db.models.functions import Coalesce

    from task_ferry.models import Heartbeat, Job
    from task_ferry.sweep import lost_jobs, unclaimed_jobs

    if not (valid_number("HEARTBEAT_TIMEOUT") and valid_number("PENDING_TIMEOUT")):
        return None  # E003 reports it.
    grace = f"{SWEEP_GRACE.total_seconds() / 60:g} minutes"
    timeout = ferry_settings.HEARTBEAT_TIMEOUT
    pending_timeout = ferry_settings.PENDING_TIMEOUT
    last_beat = Heartbeat.objects.filter(job_id=OuterRef("pk")).values("beat_at")[:1]
    # The jobs, when each went quiet, and what they are.
    kinds: list[tuple[JobQuerySet[Job], Combinable, str]] = [
        (
            lost_jobs(datetime.timedelta(seconds=timeout) + SWEEP_GRACE),
            Coalesce(Subquery(last_beat), F("started_at")),
            f"started job(s) with no heartbeat for over HEARTBEAT_TIMEOUT ({timeout:g} s) "
            f"plus {grace} (the longest: job #{{pk}}, for {{age}})",
        )
    ]
    if pending_timeout is not None:
        kinds.append(
            (
                unclaimed_jobs(datetime.timedelta(seconds=pending_timeout) + SWEEP_GRACE),
                F("created_at"),
                f"pending job(s) waiting for over PENDING_TIMEOUT ({pending_timeout:g} s) "
                f"plus {grace} (the oldest: job #{{pk}}, for {{age}})",
            )
        )
    parts = []
    # A savepoint: a query that fails (tables not migrated yet) leaves a caller's transaction
    # usable.
    with transaction.atomic(using=router.db_for_read(Job)):
        for jobs, since, what in kinds:
            count = jobs.count()
            oldest = jobs.annotate(since=since).order_by("since", "pk").values_list("pk", "since")
            # None where a sweep took them all between the two queries.
            first = oldest.first() if count else None
            if first is not None:
                parts.append(f"{count} {what.format(pk=first[0], age=describe_age(first[1]))}")
    if not parts:
        return None
    return CheckWarning(
        f"{' and '.join(parts)}: the stale-job sweep, which fails such jobs, is evidently not "
        f"running. Until it runs they stay as they are, and their users watch progress that "
        f"never moves.",
        hint="Run the sweep every minute: python manage.py task_ferry_sweep --interval 60 as a "
        "process of its own, or Celery beat with task_ferry.executors.celery.beat_schedule() in "
        "its schedule and a worker for the queue beat sends the sweep to (celery -A <project> "
        "worker -Q maintenance --concurrency 1); with django.tasks, enqueue "
        "task_ferry.executors.django_tasks.sweep_stale_jobs. See docs/reliability.md.",
        id="task_ferry.W007",
    )


def valid_number(name: str) -> bool:
    """Whether the numeric setting ``name`` passes E003."""
    value = getattr(ferry_settings, name)
    if value is None and name in MAY_BE_NONE:
        return True
    (minimum, maximum, kind) = next(
        (low, high, kind) for setting, low, high, kind in NUMBERS if setting == name
    )
    return is_number(value, kind) and minimum <= value <= maximum


def describe_age(moment: datetime.datetime) -> str:
    """How long ago ``moment`` (a job table's datetime) was: ``1:15:02``, ``2 days, 3:04:05``."""
    now = timezone.now()
    if timezone.is_naive(moment):
        # USE_TZ = False: naive local times, an hour apart across a change of daylight saving
        # time; compared in UTC, as moment_ago() does.
        zone = timezone.get_default_timezone()
        moment = timezone.make_aware(moment, zone).astimezone(datetime.UTC)
        now = timezone.make_aware(now, zone).astimezone(datetime.UTC)
    return str(datetime.timedelta(seconds=max(0, int((now - moment).total_seconds()))))


@register()
def check_job_types(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    from rest_framework.serializers import BaseSerializer

    from task_ferry.registry import JobType, job_type_registry

    messages: list[CheckMessage] = []
    for job_type in job_type_registry.all():
        max_count = job_type.max_count
        if max_count is not None and (
            isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1
        ):
            messages.append(
                Error(
                    f"{type(job_type).__qualname__}.max_count must be a positive int or None.",
                    hint="Use None to fall back to TASK_FERRY['MAX_JOBS_PER_USER_PER_TYPE'].",
                    obj=type(job_type),
                    id="task_ferry.E007",
                )
            )
        queue = job_type.queue
        if queue is not None and not isinstance(queue, str):
            # Its jobs failed to dispatch, with advice to check the broker.
            messages.append(
                Error(
                    f"{type(job_type).__qualname__}.queue must be a queue's name (a str) or "
                    f"None, got {queue!r}.",
                    hint='Name the queue, e.g. queue = "exports", or use None for the '
                    "executor's default queue.",
                    obj=type(job_type),
                    id="task_ferry.E034",
                )
            )
        serializer_class = job_type.serializer_class
        if serializer_class is not None and not (
            inspect.isclass(serializer_class) and issubclass(serializer_class, BaseSerializer)
        ):
            # Reads fall back to no fields of the type (logged); creating through the API fails.
            messages.append(
                Error(
                    f"{type(job_type).__qualname__}.serializer_class must be a DRF serializer "
                    f"class or None, got {serializer_class!r}.",
                    hint="Subclass rest_framework.serializers.ModelSerializer (or Serializer), "
                    "or use None to derive one from model_class.",
                    obj=type(job_type),
                    id="task_ferry.E035",
                )
            )
        if type(job_type).run is JobType.run:
            # Registered without a word; every job of the type then failed at its start.
            messages.append(
                Error(
                    f"{type(job_type).__qualname__} does not define run(job, progress), so "
                    f"every job of type {job_type.type!r} would fail with NotImplementedError.",
                    hint="Define run(self, job, progress) on the class: it does the job's work.",
                    obj=type(job_type),
                    id="task_ferry.E036",
                )
            )
    messages.extend(check_registered_types(job_type_registry))
    messages.extend(check_job_types_modules(job_type_registry))
    if uses_max_count():
        messages.extend(check_isolation_level())
    return messages


def uses_max_count() -> bool:
    from task_ferry.registry import job_type_registry

    return any(job_type.get_max_count() is not None for job_type in job_type_registry.all())


# ``max_count`` counts the user's live jobs with a plain read once the user's row is locked: at
# REPEATABLE READ that read sees the snapshot of the transaction's first read, not the jobs
# another create committed while this one waited for the lock. W002 comes from two checks:
# this one reads OPTIONS (no query, so ``check`` and ``runserver`` need no database), the next
# asks the database when Django runs database checks (``migrate``, ``check --database``).


def check_isolation_level() -> list[CheckMessage]:
    """W002 where the jobs' database's OPTIONS set REPEATABLE READ."""
    from django.db import connections

    from task_ferry.models import jobs_database

    connection = connections[jobs_database()]
    if not options_set_repeatable_read(connection):
        return []
    return [isolation_warning(connection.alias)]


@register(Tags.database)
def check_isolation_level_in_database(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """W002 where the jobs' database says its sessions run at REPEATABLE READ, whatever set it
    (an init_command, the server's or the role's default), unless OPTIONS said so already."""
    from django.db import connections

    from task_ferry.models import jobs_database

    alias = jobs_database()
    if not databases or alias not in databases or not uses_max_count():
        return []
    connection = connections[alias]
    options = connection.settings_dict.get("OPTIONS") or {}
    # psycopg applies an isolation_level of OPTIONS as each transaction begins: outside one, a
    # PostgreSQL session reports the server's. MySQL's sessions are SET to it when they open.
    if options_set_repeatable_read(connection) or (
        connection.vendor == "postgresql" and "isolation_level" in options
    ):
        return []
    if session_isolation_level(connection) != "repeatable read":
        return []
    return [isolation_warning(alias)]


def options_set_repeatable_read(connection: BaseDatabaseWrapper) -> bool:
    options = connection.settings_dict.get("OPTIONS") or {}
    level = options.get("isolation_level")
    if level is None:
        return False
    if connection.vendor == "mysql":
        return str(level).lower() == "repeatable read"
    if connection.vendor == "postgresql":
        from django.db.backends.postgresql.psycopg_any import IsolationLevel

        try:
            return bool(IsolationLevel(level) == IsolationLevel.REPEATABLE_READ)
        except ValueError:
            # Not a level at all: Django refuses it when it connects.
            return False
    return False


def isolation_warning(alias: str) -> CheckMessage:
    return CheckWarning(
        f"DATABASES[{alias!r}], where jobs are written, runs transactions at REPEATABLE READ. "
        f"A create_and_start() inside a transaction that has read before (ATOMIC_REQUESTS, "
        f"say) counts the user's live jobs in that older snapshot, so concurrent creates "
        f"can exceed max_count.",
        hint=f"Use READ COMMITTED, Django's default: remove 'isolation_level' from "
        f"DATABASES[{alias!r}]['OPTIONS'], or set it there to READ COMMITTED where the "
        f"server's default is another.",
        id="task_ferry.W002",
    )


def session_isolation_level(connection: BaseDatabaseWrapper) -> str | None:
    """The isolation level of the connection's transactions as the database reports it, in
    lower case ("repeatable read"); None on SQLite or if it cannot be asked."""
    if connection.vendor not in ("postgresql", "mysql"):
        return None
    try:
        if connection.vendor == "postgresql":
            sql = "SHOW transaction_isolation"
        else:
            # MariaDB before 11.1 has only the older name, MySQL 8 only the newer.
            name = (
                "tx_isolation" if connection.display_name == "MariaDB" else "transaction_isolation"
            )
            sql = f"SELECT @@SESSION.{name}"
        with connection.cursor() as cursor:
            cursor.execute(sql)
            (level,) = cursor.fetchone()
    except DatabaseError:
        return None
    # MySQL says REPEATABLE-READ.
    return str(level).replace("-", " ").lower()


def check_registered_types(registry: JobTypeRegistry) -> list[CheckMessage]:
    """Registered types whose name or model went wrong after registration."""
    from task_ferry.models import Job

    messages: list[CheckMessage] = []
    owners: dict[str, list[type[JobType]]] = {}
    for name in registry.names():
        job_type = registry.get(name)
        cls = type(job_type)
        type_name = job_type.type
        if not type_name or not isinstance(type_name, str):
            messages.append(
                Error(
                    f"{qualname(cls)} is registered as {name!r} but its `type` is {type_name!r}.",
                    hint='Give it a non-empty name: type = "...".',
                    obj=cls,
                    id="task_ferry.E030",
                )
            )
        elif type_name != name:
            messages.append(
                Error(
                    f"{qualname(cls)} is registered as {name!r} but its `type` is now "
                    f"{type_name!r}, so its jobs could not be run.",
                    hint="Do not change `type` after registration; set it in the class body.",
                    obj=cls,
                    id="task_ferry.E030",
                )
            )
            owners.setdefault(type_name, []).append(cls)
        else:
            owners.setdefault(type_name, []).append(cls)
        model_class = getattr(job_type, "model_class", None)
        if not (inspect.isclass(model_class) and issubclass(model_class, Job)):
            messages.append(
                Error(
                    f"{qualname(cls)}.model_class must be a subclass of "
                    f"task_ferry.models.Job, got {model_class!r}.",
                    hint="Point model_class at the Job subclass that stores this type's jobs.",
                    obj=cls,
                    id="task_ferry.E031",
                )
            )
    for type_name, classes in owners.items():
        if len(classes) > 1:
            messages.append(duplicate_name_error(type_name, classes))
    return messages


def check_job_types_modules(registry: JobTypeRegistry) -> list[CheckMessage]:
    """``JobType`` classes with a name, in installed apps' ``job_types`` modules, that were
    never registered."""
    from task_ferry.registry import JobType, defined_in

    messages: list[CheckMessage] = []
    for module in job_types_modules():
        for obj in vars(module).values():
            if not (
                inspect.isclass(obj)
                and issubclass(obj, JobType)
                and obj is not JobType
                and defined_in(obj, module)
                and obj.type
            ):
                continue
            name = obj.type
            registered = registry.get(name) if name in registry else None
            if registered is not None and type(registered) is obj:
                continue
            if not hasattr(obj, "model_class"):
                messages.append(
                    Error(
                        f"{qualname(obj)} sets type = {name!r} but has no model_class, so it "
                        f"was not registered.",
                        hint="Set model_class to the Job subclass that stores its jobs.",
                        obj=obj,
                        id="task_ferry.E033",
                    )
                )
            elif registered is not None:
                messages.append(duplicate_name_error(name, [type(registered), obj]))
    return messages


def job_types_modules() -> list[ModuleType]:
    from django.apps import apps
    from django.utils.module_loading import module_has_submodule

    return [
        import_module(f"{app_config.name}.job_types")
        for app_config in apps.get_app_configs()
        if module_has_submodule(app_config.module, "job_types")
    ]


@register(Tags.urls)
def check_api_apps(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    if apps.is_installed("rest_framework") or not api_is_routed():
        return []
    return [
        CheckWarning(
            "task_ferry's API is in the URLconf, but 'rest_framework' is not in INSTALLED_APPS: "
            "a request that accepts text/html (a browser, the browsable API) fails with "
            "TemplateDoesNotExist.",
            hint='Add "rest_framework" to INSTALLED_APPS.',
            id="task_ferry.W040",
        )
    ]


def api_is_routed() -> bool:
    """Whether a view of ``task_ferry.api`` is anywhere in the root URLconf."""
    try:
        patterns = list(get_resolver().url_patterns)
    except Exception:
        # A URLconf that does not load is Django's own check's to report.
        return False
    while patterns:
        pattern = patterns.pop()
        if isinstance(pattern, URLResolver):
            patterns.extend(pattern.url_patterns)
            continue
        view = pattern.callback
        module = getattr(getattr(view, "cls", view), "__module__", "")
        if module.startswith("task_ferry.api."):
            return True
    return False


def duplicate_name_error(name: str, classes: list[type[JobType]]) -> Error:
    return Error(
        f"Job type name {name!r} is claimed by {' and '.join(qualname(c) for c in classes)}.",
        hint="Give each job type its own `type` name. A subclass inherits its parent's name "
        "unless it sets its own.",
        obj=classes[-1],
        id="task_ferry.E032",
    )


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Seconds a worker's start waits for task_ferry's checks: W001 asks Redis, the database checks
# ask the database, and one that does not answer must not hold the worker back.
START_CHECKS_TIMEOUT = 10.0


def log_checks_at_start(
    extra: Callable[[], Iterable[CheckMessage]] = tuple,
    *,
    timeout: float = START_CHECKS_TIMEOUT,
) -> None:
    """Run task_ferry's system checks, the database ones included, with ``extra()``'s
    messages, and log each message that is not silenced: for worker processes, which no
    ``check`` ever sees (Celery's Django fixup runs the checks at a worker's start and drops
    what they find). An error is logged, and the process goes on.

    Waits ``timeout`` seconds at most: the checks run in a thread of their own, which logs
    what they find when they end, however late."""

    def run() -> None:
        from django.db import connections

        try:
            log_check_messages([*run_own_checks(), *run_extra(extra)])
        finally:
            # This thread's connections: Django's are per thread.
            connections.close_all()

    thread = threading.Thread(target=run, name="task_ferry-checks", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning(
            "task_ferry's system checks have not ended after %g s (a database or progress store "
            "that does not answer?): starting without them; what they find is logged when "
            "they end.",
            timeout,
        )


def own_checks() -> list[Callable[..., Iterable[CheckMessage]]]:
    """The checks this module registered with Django, by name."""
    from django.core.checks.registry import registry

    return sorted(
        (check for check in registry.get_checks() if check.__module__ == __name__),
        key=lambda check: check.__name__,
    )


def run_own_checks() -> list[CheckMessage]:
    """What ``check --database <every alias>`` says of task_ferry, without Django's and other
    apps' checks. A check that raises is logged and the others run."""
    from django.conf import settings

    # Each check asks only the aliases it needs (the jobs', the cache table's).
    databases = list(settings.DATABASES)
    messages: list[CheckMessage] = []
    for check in own_checks():
        try:
            messages.extend(check(app_configs=None, databases=databases))
        except Exception:
            logger.exception("task_ferry's system check %s() failed", check.__name__)
    return messages


def run_extra(extra: Callable[[], Iterable[CheckMessage]]) -> list[CheckMessage]:
    try:
        return list(extra())
    except Exception:
        logger.exception(
            "task_ferry's start-up check %s() failed", getattr(extra, "__name__", extra)
        )
        return []


def log_check_messages(messages: Iterable[CheckMessage]) -> None:
    """Log each message, errors first, at its level (a critical one at ERROR), unless
    ``SILENCED_SYSTEM_CHECKS`` names it."""
    shown = sorted(
        (message for message in messages if not message.is_silenced()),
        key=lambda message: (-message.level, message.id or ""),
    )
    for message in shown:
        hint = f" HINT: {message.hint}" if message.hint else ""
        logger.log(
            min(message.level, ERROR),
            "System check (%s): %s%s",
            message.id or "no id",
            message.msg,
            hint,
        )
