"""The progress store interface, and ``get_store()`` which builds the configured one."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

from django.core.checks import CheckMessage
from django.utils.module_loading import import_string

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import (
    ProgressStoreUnavailable,
    SnapshotsNotForgotten,
    TaskFerryImproperlyConfigured,
)


class CancelListener(ABC):
    """Receives the cancel requests of every job, pushed by the store. One per worker process,
    held by the process's monitor thread."""

    @abstractmethod
    def wait(self, timeout: float) -> list[int]:
        """Block up to ``timeout`` seconds for cancel requests; the ids of jobs asked to stop.

        Raises ``ProgressStoreUnavailable`` when the connection is lost; open a new listener.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the listener's connection."""


class ProgressStore(ABC):
    """Keeps job snapshots and cancel requests. Every method may raise
    ``ProgressStoreUnavailable``; callers on a job's path catch it and carry on."""

    #: True when ``cancel_listener()`` pushes cancel requests; otherwise they are polled with
    #: ``cancel_requests()`` once per ``PUBLISH_INTERVAL``.
    supports_push: bool = False

    def __init__(self, *, timeout: int, key_prefix: str) -> None:
        self.timeout = timeout
        self.key_prefix = key_prefix

    def snapshot_key(self, job_id: int) -> str:
        return f"{self.key_prefix}:job:{job_id}"

    def cancel_key(self, job_id: int) -> str:
        return f"{self.key_prefix}:cancel:{job_id}"

    @property
    def channel_prefix(self) -> str:
        """What the names of the store's channels start with: its key prefix, and whatever
        else a store needs to keep its channels apart from other stores' on the same server."""
        return self.key_prefix

    def events_channel(self, job_id: int) -> str:
        return f"{self.channel_prefix}:events:{job_id}"

    @property
    def cancel_channel(self) -> str:
        """Where push stores announce cancel requests (the message is the job id)."""
        return f"{self.channel_prefix}:cancel"

    @abstractmethod
    def write(self, job_id: int, snapshot: dict[str, Any]) -> None:
        """Store the job's newest snapshot and announce it to listeners."""

    def write_if_absent(self, job_id: int, snapshot: dict[str, Any]) -> bool:
        """Store a snapshot built from the job's row unless the store holds one already, without
        announcing it; whether it stored it. The API does this for a live job the store knows
        nothing of (a pending job's first poll), so that a snapshot the job's run wrote
        meanwhile is never replaced by this older one. The built-in stores do it with one atomic
        "add". This fallback, for stores that do not override it, reads then writes (announcing
        the snapshot): it can lose that race, and then shows the older state until the job's
        next write."""
        if self.read(job_id) is not None:
            return False
        self.write(job_id, snapshot)
        return True

    def write_many(self, snapshots: dict[int, dict[str, Any]]) -> None:
        """``write()`` several jobs' snapshots; stores override this to do it in one go."""
        for job_id, snapshot in snapshots.items():
            self.write(job_id, snapshot)

    @abstractmethod
    def read(self, job_id: int) -> dict[str, Any] | None:
        """The job's newest snapshot, or None if the store has none."""

    @abstractmethod
    def read_many(self, job_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Snapshots of several jobs at once; jobs without one are left out."""

    @abstractmethod
    def request_cancel(self, job_id: int, token: str = "") -> None:
        """Record a cancel request and wake the monitor running the job.

        ``token`` (``snapshot.cancel_token(job)``) tells the job apart from an earlier one that
        had the same id, whose request may still be stored.
        """

    @abstractmethod
    def cancel_requests(self, job_ids: Iterable[int]) -> dict[int, str]:
        """The stored cancel requests of these jobs, as job id -> token."""

    def is_cancel_requested(self, job_id: int) -> bool:
        return job_id in self.cancel_requests([job_id])

    @abstractmethod
    def delete(self, job_ids: Iterable[int]) -> None:
        """Forget the jobs' snapshots and cancel requests. A store that does it in several
        calls (``delete_in_batches()``) raises ``SnapshotsNotForgotten`` when one fails."""

    def cancel_listener(self) -> CancelListener:
        """A listener for cancel requests of all jobs; only push stores have one."""
        raise NotImplementedError(f"{type(self).__name__} does not push cancel requests.")

    def check(self) -> list[CheckMessage]:
        """System-check messages about this store's configuration."""
        return []


def delete_in_batches(
    job_ids: Iterable[int], batch_size: int, delete_batch: Callable[[list[int]], None]
) -> None:
    """``delete_batch()`` the jobs ``batch_size`` at a time. When one fails, raises
    ``SnapshotsNotForgotten`` with the jobs of that batch and the later ones."""
    ids = list(job_ids)
    for start in range(0, len(ids), batch_size):
        try:
            delete_batch(ids[start : start + batch_size])
        except ProgressStoreUnavailable as exc:
            # The later batches are not tried: a store down or frozen would make each of them
            # wait for its own timeout (with Redis 2 s, 200 times for 100,000 jobs) in the
            # commit of the delete, and refusals (a read-only replica) would refuse them too.
            # What is left expires after PROGRESS_CACHE_TIMEOUT.
            raise SnapshotsNotForgotten(str(exc), ids[start:]) from exc


def default_store_path() -> str:
    if ferry_settings.PROGRESS_STORE:
        return str(ferry_settings.PROGRESS_STORE)
    if ferry_settings.REDIS_URL:
        return "task_ferry.stores.redis.RedisProgressStore"
    return "task_ferry.stores.cache.CacheProgressStore"


@functools.cache
def get_store() -> ProgressStore:
    """The configured progress store, built once per process (reset when settings change).
    ``TaskFerryImproperlyConfigured`` if it cannot be built: a ``PROGRESS_STORE`` that does not
    import, a ``REDIS_URL`` that is no Redis URL."""
    path = default_store_path()
    try:
        store_class = import_string(path)
        store = store_class(
            timeout=ferry_settings.PROGRESS_CACHE_TIMEOUT, key_prefix=ferry_settings.KEY_PREFIX
        )
    except (ImportError, TypeError, ValueError) as exc:
        raise TaskFerryImproperlyConfigured(
            f"The progress store {path!r} cannot be built: {exc}. Fix TASK_FERRY's "
            f"PROGRESS_STORE or REDIS_URL (`python manage.py check` says which)."
        ) from exc
    if not isinstance(store, ProgressStore):
        raise TaskFerryImproperlyConfigured(
            f"TASK_FERRY['PROGRESS_STORE'] = {path!r} is not a subclass of "
            f"task_ferry.stores.base.ProgressStore."
        )
    return store
