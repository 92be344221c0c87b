"""The progress store interface, and ``get_store()`` which builds the configured one."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from django.core.checks import CheckMessage
from django.utils.module_loading import import_string

from task_ferry.conf import ferry_settings


class CancelListener(ABC):
    """Waits for a cancel request of one job. Used by the job's monitor thread."""

    @abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True once a cancel request has arrived."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the listener's connection."""


class ProgressStore(ABC):
    """Keeps job snapshots and cancel requests. Every method may raise
    ``ProgressStoreUnavailable``; callers on a job's path catch it and carry on."""

    #: True when ``cancel_listener`` pushes requests instead of polling for them.
    supports_push: bool = False

    def __init__(self, *, timeout: int, key_prefix: str) -> None:
        self.timeout = timeout
        self.key_prefix = key_prefix

    def snapshot_key(self, job_id: int) -> str:
        return f"{self.key_prefix}:job:{job_id}"

    def cancel_key(self, job_id: int) -> str:
        return f"{self.key_prefix}:cancel:{job_id}"

    def events_channel(self, job_id: int) -> str:
        return f"{self.key_prefix}:events:{job_id}"

    @abstractmethod
    def write(self, job_id: int, snapshot: dict[str, Any]) -> None:
        """Store the job's newest snapshot and announce it to listeners."""

    @abstractmethod
    def read(self, job_id: int) -> dict[str, Any] | None:
        """The job's newest snapshot, or None if the store has none."""

    @abstractmethod
    def read_many(self, job_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Snapshots of several jobs at once; jobs without one are left out."""

    @abstractmethod
    def request_cancel(self, job_id: int) -> None:
        """Record a cancel request and wake the job's listener."""

    @abstractmethod
    def is_cancel_requested(self, job_id: int) -> bool: ...

    @abstractmethod
    def delete(self, job_ids: Iterable[int]) -> None:
        """Forget the jobs' snapshots and cancel requests."""

    def cancel_listener(self, job_id: int) -> CancelListener:
        """A listener that polls ``is_cancel_requested``; push stores override this."""
        return PollingCancelListener(self, job_id)

    def check(self) -> list[CheckMessage]:
        """System-check messages about this store's configuration."""
        return []


class PollingCancelListener(CancelListener):
    def __init__(self, store: ProgressStore, job_id: int) -> None:
        import threading

        self.store = store
        self.job_id = job_id
        self._sleep = threading.Event()

    def wait(self, timeout: float) -> bool:
        self._sleep.wait(timeout)
        return self.store.is_cancel_requested(self.job_id)


def default_store_path() -> str:
    if ferry_settings.PROGRESS_STORE:
        return str(ferry_settings.PROGRESS_STORE)
    if ferry_settings.REDIS_URL:
        return "task_ferry.stores.redis.RedisProgressStore"
    return "task_ferry.stores.cache.CacheProgressStore"


@functools.cache
def get_store() -> ProgressStore:
    """The configured progress store, built once per process (reset when settings change)."""
    store_class = import_string(default_store_path())
    store: ProgressStore = store_class(
        timeout=ferry_settings.PROGRESS_CACHE_TIMEOUT, key_prefix=ferry_settings.KEY_PREFIX
    )
    return store
