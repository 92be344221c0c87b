"""The ``TASK_FERRY`` settings: defaults in one dict, read lazily, reset when settings change.

Usage::

    from task_ferry.conf import ferry_settings
    ferry_settings.JOB_EXPIRY_DAYS
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from task_ferry.exceptions import TaskFerryImproperlyConfigured

SETTINGS_NAME = "TASK_FERRY"

DEFAULTS: dict[str, Any] = {
    # Dotted path of the executor class that runs jobs.
    "EXECUTOR": "task_ferry.executors.immediate.ImmediateExecutor",
    # Celery queue used when a JobType sets no ``queue`` of its own.
    "CELERY_QUEUE": "default",
    # Seconds past a type's time_limit after which Celery kills a run that did not stop (its
    # hard time limit); None sends no hard limit.
    "CELERY_TIME_LIMIT_GRACE": 60,
    # django.tasks backend alias used by DjangoTasksExecutor.
    "TASKS_BACKEND": "default",
    # Seconds a job's progress snapshot lives in the progress store.
    "PROGRESS_CACHE_TIMEOUT": 3600,
    # Ended jobs older than this many days are removed by cleanup_old_jobs().
    "JOB_EXPIRY_DAYS": 7,
    # Default JobType.max_count; None means no limit.
    "MAX_JOBS_PER_USER_PER_TYPE": None,
    # Redis URL of the progress store. When unset, Django's cache is used instead.
    "REDIS_URL": None,
    # Dotted path of a progress store class; None picks Redis or the cache from the settings.
    "PROGRESS_STORE": None,
    # CACHES alias used by the cache progress store.
    "CACHE_ALIAS": "default",
    # Key prefix for everything task_ferry writes to the progress store.
    "KEY_PREFIX": "task_ferry",
    # Seconds between progress publications while a job ticks.
    "PUBLISH_INTERVAL": 0.05,
    # Seconds between heartbeats of a running job.
    "HEARTBEAT_INTERVAL": 10,
    # A started job whose last heartbeat is older than this many seconds is failed as lost.
    "HEARTBEAT_TIMEOUT": 60,
    # A pending job older than this many seconds is failed as never picked up; None disables.
    "PENDING_TIMEOUT": 24 * 3600,
    # Permission class of the REST API; see docs/api.md for the staff variant.
    "API_PERMISSION_CLASS": "task_ferry.api.permissions.IsJobOwner",
    # Seconds of silence after which an event stream sends a keep-alive comment.
    "SSE_KEEPALIVE": 15,
    # Seconds an event stream stays open at most; the browser then reconnects.
    "SSE_MAX_DURATION": 300,
    # Live event streams one user may hold open at once in one process; more are answered as
    # polls. None means no limit.
    "SSE_MAX_STREAMS_PER_USER": 20,
}


class FerrySettings:
    """Attribute access to ``settings.TASK_FERRY`` merged over ``DEFAULTS``."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    @property
    def user_settings(self) -> dict[str, Any]:
        value = getattr(settings, SETTINGS_NAME, None)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TaskFerryImproperlyConfigured(
                f"{SETTINGS_NAME} must be a dict of settings, got {type(value).__name__}: "
                f"{value!r}. For example: {SETTINGS_NAME} = "
                '{"EXECUTOR": "task_ferry.executors.celery.CeleryExecutor"}.'
            )
        return dict(value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in DEFAULTS:
            raise AttributeError(f"{SETTINGS_NAME} has no setting named {name!r}")
        if name not in self._cache:
            self._cache[name] = self.user_settings.get(name, DEFAULTS[name])
        return self._cache[name]

    def reload(self) -> None:
        self._cache.clear()
        # Imported objects built from settings are cached where they are built.
        from task_ferry.executors.base import get_executor
        from task_ferry.stores.base import get_store

        get_executor.cache_clear()
        get_store.cache_clear()


ferry_settings = FerrySettings()


@receiver(setting_changed)
def _reload_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting in (SETTINGS_NAME, "CACHES", "TASKS"):
        ferry_settings.reload()
