"""The production progress store: Redis through redis-py, with push for cancel requests."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote_plus

import redis
from django.core.checks import CheckMessage, Warning
from redis.client import PubSub

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import ProgressStoreUnavailable
from task_ferry.stores.base import CancelListener, ProgressStore, delete_in_batches

# Fail fast: a poll or a tick must never hang on a Redis that went away.
SOCKET_TIMEOUT = 2.0
# Jobs per DEL (two keys each) and per round trip of deletion notices in ``delete()``.
DELETE_BATCH_SIZE = 500


# The password of a URL's user information: after the first ":" of what comes before the last
# "@" of its authority, as redis-py (urllib) reads it; the user name may hold an "@" itself.
URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/?#]*):[^/?#]*@", re.IGNORECASE)
# A query parameter, whose name redis-py decodes (``pass%77ord`` is ``password``).
QUERY_PARAMETER = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def redacted_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: messages name the Redis they
    failed on, and the admin, the commands and the logs show them. redis-py takes a password
    from the user information and from the query."""

    def redacted_parameter(match: re.Match[str]) -> str:
        if unquote_plus(match[2]) != "password":
            return match[0]
        return f"{match[1]}{match[2]}=***"

    return QUERY_PARAMETER.sub(redacted_parameter, URL_PASSWORD.sub(r"\1:***@", url))


def deletion_notice(job_id: int) -> str:
    """What ``delete()`` publishes on a job's events channel, in place of a snapshot."""
    return json.dumps({"id": job_id, "deleted": True}, separators=(",", ":"))


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
        #: The URL as messages and logs show it: without its password.
        self.shown_url = redacted_url(self.url)
        # Redis keeps keys per database but has one set of channels for the whole server:
        # without its database number, a project on /1 would hear cancel requests and events
        # of a project on /2 with the same KEY_PREFIX (the default, say) for its own job ids.
        database = self.client.connection_pool.connection_kwargs.get("db") or 0
        self._channel_prefix = f"{key_prefix}:db{database}"

    @property
    def channel_prefix(self) -> str:
        return self._channel_prefix

    @contextlib.contextmanager
    def _failing(self, doing: str) -> Iterator[None]:
        """A Redis error inside becomes ``ProgressStoreUnavailable``: "Could not <doing> Redis
        at <url>: <error>"."""
        try:
            yield
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(
                f"Could not {doing} Redis at {self.shown_url}: {exc}"
            ) from exc

    def write(self, job_id: int, snapshot: dict[str, Any]) -> None:
        self.write_many({job_id: snapshot})

    def write_many(self, snapshots: dict[int, dict[str, Any]]) -> None:
        if not snapshots:
            return
        with self._failing("write to"):
            pipe = self.client.pipeline(transaction=False)
            for job_id, snapshot in snapshots.items():
                payload = json.dumps(snapshot, separators=(",", ":"))
                pipe.set(self.snapshot_key(job_id), payload, ex=self.timeout)
                pipe.publish(self.events_channel(job_id), payload)
            pipe.execute()

    def write_if_absent(self, job_id: int, snapshot: dict[str, Any]) -> bool:
        payload = json.dumps(snapshot, separators=(",", ":"))
        with self._failing("write to"):
            # SET NX answers OK when it set the key, nil when the key was there.
            written = self.client.set(self.snapshot_key(job_id), payload, ex=self.timeout, nx=True)
        return bool(written)

    def read_raw(self, job_id: int) -> bytes | None:
        """The stored snapshot as JSON bytes, for responses that can pass them on as they are."""
        with self._failing("read from"):
            raw = self.client.get(self.snapshot_key(job_id))
        return raw if raw is None or isinstance(raw, bytes) else raw.encode()

    def read(self, job_id: int) -> dict[str, Any] | None:
        raw = self.read_raw(job_id)
        return None if raw is None else json.loads(raw)

    def read_many(self, job_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(job_ids)
        if not ids:
            return {}
        with self._failing("read from"):
            values = self.client.mget([self.snapshot_key(i) for i in ids])
        return {i: json.loads(v) for i, v in zip(ids, values, strict=True) if v is not None}

    def request_cancel(self, job_id: int, token: str = "") -> None:
        with self._failing("record the cancel request in"):
            pipe = self.client.pipeline(transaction=False)
            # The key covers a job whose worker subscribes later; the message wakes one already
            # running.
            pipe.set(self.cancel_key(job_id), token, ex=self.timeout)
            pipe.publish(self.cancel_channel, str(job_id))
            pipe.execute()

    def cancel_requests(self, job_ids: Iterable[int]) -> dict[int, str]:
        ids = list(job_ids)
        if not ids:
            return {}
        with self._failing("read from"):
            values = self.client.mget([self.cancel_key(i) for i in ids])
        return {
            i: v.decode() if isinstance(v, bytes) else str(v)
            for i, v in zip(ids, values, strict=True)
            if v is not None
        }

    def delete(self, job_ids: Iterable[int]) -> None:
        # In batches: Redis runs one command at a time, and a DEL of every key of a delete of
        # 100,000 jobs would hold up every other client, workers' progress included.
        delete_in_batches(job_ids, DELETE_BATCH_SIZE, self._delete_batch)

    def _delete_batch(self, job_ids: list[int]) -> None:
        with self._failing("delete from"):
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*[k for i in job_ids for k in (self.snapshot_key(i), self.cancel_key(i))])
            # Open event streams of the jobs would otherwise wait for a change that never
            # comes. Each after its job's DEL: a stream that read the snapshot still gets it.
            for job_id in job_ids:
                pipe.publish(self.events_channel(job_id), deletion_notice(job_id))
            pipe.execute()

    def cancel_listener(self) -> CancelListener:
        return RedisCancelListener(self)

    def check(self) -> list[CheckMessage]:
        try:
            self.client.ping()
        except (redis.ResponseError, redis.AuthenticationError) as exc:
            # Redis answered: it runs, but refuses this URL (a database number past its
            # `databases`, a wrong user or password; redis-py counts the latter a ConnectionError).
            return [
                Warning(
                    f"The progress store's Redis at {self.shown_url} refuses the connection: {exc}",
                    hint="Fix TASK_FERRY['REDIS_URL'] (its database number, user or password). "
                    "Until then, progress is only visible once a job ends.",
                    id="task_ferry.W001",
                )
            ]
        except redis.RedisError as exc:
            return [
                Warning(
                    f"The progress store's Redis at {self.shown_url} is unreachable: {exc}",
                    hint="Start Redis or fix TASK_FERRY['REDIS_URL']. Until then, progress is "
                    "only visible once a job ends.",
                    id="task_ferry.W001",
                )
            ]
        return []


class RedisCancelListener(CancelListener):
    """A subscription to the store's cancel channel, on a connection of its own."""

    def __init__(self, store: RedisProgressStore) -> None:
        self.store = store
        # Not ignore_subscribe_messages: redis-py would turn a confirmation into None, which
        # looks like "nothing arrived" and would end a wait early. wait() skips them instead.
        self.pubsub: PubSub = store.client.pubsub()
        try:
            self.pubsub.subscribe(store.cancel_channel)
        except redis.RedisError as exc:
            self.close()
            raise ProgressStoreUnavailable(
                f"Could not subscribe to cancel requests in Redis at {store.shown_url}: {exc}"
            ) from exc

    def wait(self, timeout: float) -> list[int]:
        job_ids: list[int] = []
        try:
            message = self.pubsub.get_message(timeout=timeout)
            while message is not None:
                if message["type"] == "message":
                    with contextlib.suppress(ValueError):
                        job_ids.append(int(message["data"]))
                message = self.pubsub.get_message(timeout=0)
        except redis.RedisError as exc:
            raise ProgressStoreUnavailable(f"Lost the Redis cancel channel: {exc}") from exc
        return job_ids

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.pubsub.close()
