"""A progress store on Django's cache framework, for set-ups without Redis.

Cancel requests are polled, not pushed. Use a cache shared by all processes (database, file,
memcached or Redis cache) when jobs run in a worker; ``locmem`` only works in one process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.base import BaseCache, memcache_key_warnings
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.checks import CheckMessage, Error, Warning

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import ProgressStoreUnavailable
from task_ferry.stores.base import ProgressStore, delete_in_batches

# Keys per delete_many() in delete(). The database cache sends them as the parameters of one
# statement (SQLite takes 32,766 by default, 999 before 3.32; PostgreSQL with server-side
# binding 65,535), Django's Redis cache in one DEL, which Redis runs serving no one else.
DELETE_BATCH_KEYS = 500


class CacheProgressStore(ProgressStore):
    def __init__(self, *, timeout: int, key_prefix: str, alias: str | None = None) -> None:
        super().__init__(timeout=timeout, key_prefix=key_prefix)
        self.alias = alias or ferry_settings.CACHE_ALIAS

    @property
    def cache(self) -> BaseCache:
        return caches[self.alias]

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.cache, method)(*args, **kwargs)
        except Exception as exc:
            raise ProgressStoreUnavailable(
                f"The {self.alias!r} cache failed during {method}: {exc}"
            ) from exc

    def write(self, job_id: int, snapshot: dict[str, Any]) -> None:
        # A cache has no listeners to announce to.
        self._call("set", self.snapshot_key(job_id), snapshot, self.timeout)

    def write_if_absent(self, job_id: int, snapshot: dict[str, Any]) -> bool:
        return bool(self._call("add", self.snapshot_key(job_id), snapshot, self.timeout))

    def write_many(self, snapshots: dict[int, dict[str, Any]]) -> None:
        values = {self.snapshot_key(i): snapshot for i, snapshot in snapshots.items()}
        if values:
            self._call("set_many", values, self.timeout)

    def read(self, job_id: int) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self._call("get", self.snapshot_key(job_id))
        return value

    def read_many(self, job_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        keys = {self.snapshot_key(i): i for i in job_ids}
        if not keys:
            return {}
        found = self._call("get_many", list(keys))
        return {keys[key]: value for key, value in found.items()}

    def request_cancel(self, job_id: int, token: str = "") -> None:
        self._call("set", self.cancel_key(job_id), token, self.timeout)

    def cancel_requests(self, job_ids: Iterable[int]) -> dict[int, str]:
        keys = {self.cancel_key(i): i for i in job_ids}
        if not keys:
            return {}
        found = self._call("get_many", list(keys))
        return {keys[key]: str(value) for key, value in found.items() if value is not None}

    def delete(self, job_ids: Iterable[int]) -> None:
        # Two keys a job.
        delete_in_batches(job_ids, DELETE_BATCH_KEYS // 2, self._delete_batch)

    def _delete_batch(self, job_ids: list[int]) -> None:
        keys = [k for i in job_ids for k in (self.snapshot_key(i), self.cancel_key(i))]
        self._call("delete_many", keys)

    def is_configured(self) -> bool:
        """Whether ``CACHE_ALIAS`` names a cache of ``CACHES``."""
        return isinstance(self.alias, str) and self.alias in settings.CACHES

    def check(self) -> list[CheckMessage]:
        if not self.is_configured():
            return [
                Error(
                    f"TASK_FERRY['CACHE_ALIAS'] is {self.alias!r}, which is not in CACHES: "
                    f"progress and cancel requests would go nowhere.",
                    hint=f"Use one of {sorted(settings.CACHES)}, or set TASK_FERRY['REDIS_URL'].",
                    id="task_ferry.E009",
                )
            ]
        return [*self.check_key_prefix(), *self.check_shared_with_workers()]

    def check_key_prefix(self) -> list[CheckMessage]:
        """W004: keys memcached refuses (whitespace, control characters, over 250 characters)."""
        # The longest key the store writes, as the cache makes it (its own prefix and version).
        longest = self.cache.make_key(self.cancel_key(2**63 - 1))
        if next(memcache_key_warnings(longest), None) is None:
            return []
        return [
            Warning(
                f"TASK_FERRY['KEY_PREFIX'] = {self.key_prefix!r} makes keys that memcached refuses "
                f"(with whitespace or control characters, or longer than 250 characters), "
                f"such as {longest!r}: on memcached every progress write and cancel request "
                f"would fail, and other caches warn at each.",
                hint="Use a short KEY_PREFIX of letters, digits, '-', '_' or ':'.",
                id="task_ferry.W004",
            )
        ]

    def check_shared_with_workers(self) -> list[CheckMessage]:
        """W003: a cache the worker processes cannot share with the web process."""
        cache = self.cache
        if isinstance(cache, LocMemCache):
            kind = "a LocMemCache, which each process keeps to itself"
        elif isinstance(cache, DummyCache):
            kind = "a DummyCache, which stores nothing"
        else:
            return []
        from task_ferry.executors.base import get_executor

        try:
            executor = get_executor()
        except Exception:
            return []  # E001 reports it (a bad path, a class where a path belongs).
        if not executor.runs_out_of_process:
            return []
        return [
            Warning(
                f"The progress store is the cache {self.alias!r}, {kind}, and "
                f"{type(executor).__name__} runs jobs in worker processes: the API would not "
                f"see their progress nor when they end (it would answer what it saw first, for "
                f"up to PROGRESS_CACHE_TIMEOUT), and cancel requests would not reach them.",
                hint="Set TASK_FERRY['REDIS_URL'] (e.g. \"redis://127.0.0.1:6379/0\"), or point "
                "TASK_FERRY['CACHE_ALIAS'] at a cache your web and worker processes share "
                "(database, file, memcached or Redis cache).",
                id="task_ferry.W003",
            )
        ]
