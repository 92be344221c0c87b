"""The production progress store: Redis through redis-py, with push for cancel requests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from typing import Any

import redis
from django.core.checks import CheckMessage, Warning
from redis.client import PubSub

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import ProgressStoreUnavailable
from task_ferry.stores.base import CancelListener, ProgressStore

# Fail fast: a poll or a tick must never hang on a Redis that went away.
SOCKET_TIMEOUT = 2.0


class RedisProgressStore(ProgressStore):
    supports_push = True

    def __init__(self, *, timeout: int, key_prefix: str, url: str | None = None) -> None:
        super().__init__(timeout=timeout, key_prefix=key_prefix)
        self.url = url or ferry_settings.REDIS_URL
        self.client = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            health_check_interval=30,
        )

    def write(self, job_id: int, snapshot: dict[str, Any]) -> None:
        payload = json.dumps(snapshot, separators=(",", ":"))
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.snapshot_key(job_id), payload, ex=self.timeout)
            pipe.publish(self.events_channel(job_id), payload)
            pipe.execute()
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(
                f"Could not write to Redis at {self.url}: {exc}"
            ) from exc

    def read_raw(self, job_id: int) -> bytes | None:
        """The stored snapshot as JSON bytes, for responses that can pass them on as they are."""
        try:
            raw = self.client.get(self.snapshot_key(job_id))
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(
                f"Could not read from Redis at {self.url}: {exc}"
            ) from exc
        return raw if raw is None or isinstance(raw, bytes) else raw.encode()

    def read(self, job_id: int) -> dict[str, Any] | None:
        raw = self.read_raw(job_id)
        return None if raw is None else json.loads(raw)

    def read_many(self, job_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(job_ids)
        if not ids:
            return {}
        try:
            values = self.client.mget([self.snapshot_key(i) for i in ids])
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(
                f"Could not read from Redis at {self.url}: {exc}"
            ) from exc
        return {i: json.loads(v) for i, v in zip(ids, values, strict=True) if v is not None}

    def request_cancel(self, job_id: int) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.cancel_key(job_id), b"1", ex=self.timeout)
            pipe.publish(self.cancel_key(job_id), b"1")
            pipe.execute()
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(
                f"Could not record the cancel request in Redis at {self.url}: {exc}"
            ) from exc

    def is_cancel_requested(self, job_id: int) -> bool:
        try:
            return bool(self.client.exists(self.cancel_key(job_id)))
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(
                f"Could not read from Redis at {self.url}: {exc}"
            ) from exc

    def delete(self, job_ids: Iterable[int]) -> None:
        keys = [k for i in job_ids for k in (self.snapshot_key(i), self.cancel_key(i))]
        if not keys:
            return
        try:
            self.client.delete(*keys)
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(
                f"Could not delete from Redis at {self.url}: {exc}"
            ) from exc

    def cancel_listener(self, job_id: int) -> CancelListener:
        return RedisCancelListener(self, job_id)

    def check(self) -> list[CheckMessage]:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return [
                Warning(
                    f"The progress store's Redis at {self.url} is unreachable: {exc}",
                    hint="Start Redis or fix TASK_FERRY['REDIS_URL']. Until then, progress is "
                    "only visible once a job ends.",
                    id="task_ferry.W001",
                )
            ]
        return []


class RedisCancelListener(CancelListener):
    """Subscribes to the job's cancel channel, then checks the key for a request made earlier."""

    def __init__(self, store: RedisProgressStore, job_id: int) -> None:
        self.store = store
        self.job_id = job_id
        self.pubsub: PubSub | None = store.client.pubsub(ignore_subscribe_messages=True)
        self._cancelled = False
        try:
            self.pubsub.subscribe(store.cancel_key(job_id))
            self._cancelled = store.is_cancel_requested(job_id)
        except (redis.RedisError, ProgressStoreUnavailable):
            self.pubsub = None

    def wait(self, timeout: float) -> bool:
        if self._cancelled:
            return True
        if self.pubsub is None:
            # Redis was down when the job started: poll until it is back.
            self._cancelled = self.store.is_cancel_requested(self.job_id)
            if not self._cancelled:
                import time

                time.sleep(timeout)
            return self._cancelled
        try:
            message = self.pubsub.get_message(timeout=timeout)
        except redis.RedisError as exc:
            self.pubsub = None
            raise ProgressStoreUnavailable(f"Lost the Redis cancel channel: {exc}") from exc
        if message is not None and message.get("type") == "message":
            self._cancelled = True
        return self._cancelled

    def close(self) -> None:
        if self.pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                self.pubsub.close()
