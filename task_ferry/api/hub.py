"""One Redis pub/sub connection per event loop, shared by every event stream it serves.

A stream subscribes to its job's channel here and gets a queue of the raw snapshots published
on it. However many streams follow however many jobs, the process holds one subscriber
connection and reads each publication once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref

import redis
import redis.asyncio
from redis.asyncio.client import PubSub

logger = logging.getLogger("task_ferry")

__all__ = ["EventHub", "get_hub"]

# How long a subscription may take to be confirmed before the stream gives up on push.
SUBSCRIBE_TIMEOUT = 5.0
# Seconds the reader waits for a message before looking again (so it notices a lost link).
READ_TIMEOUT = 5.0
# Longest wait for Redis to take a command or answer one, reads of the reader aside.
SOCKET_TIMEOUT = 2.0


class EventHub:
    def __init__(self, url: str) -> None:
        self.url = url
        # A socket timeout too: a write to a dead link must not hold the lock for good.
        self.client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=SOCKET_TIMEOUT
        )
        self._pubsub: PubSub | None = None
        self._queues: dict[str, set[asyncio.Queue[bytes | None]]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        # The connection the reader reads: a new connection needs a reader of its own.
        self._reader_pubsub: PubSub | None = None
        # Held while connecting and subscribing, which take seconds against a Redis that does
        # not answer: one attempt at a time.
        self._lock = asyncio.Lock()
        # Subscriptions that failed to reach Redis: the ones waiting for the lock meanwhile
        # fail with them.
        self._failed_attempts = 0
        # Unsubscribes of cancelled subscriptions, kept referenced until they are done.
        self._pending: set[asyncio.Task[None]] = set()
        #: False from a lost connection or a failed subscription until a subscription is
        #: confirmed, so that an outage is logged once, not once per stream.
        self.reachable = True

    async def subscribe(self, channel: str) -> asyncio.Queue[bytes | None]:
        """A queue of what is published on ``channel`` from now on; ``None`` in it means the
        link to Redis was lost. Raises ``redis.RedisError`` if Redis cannot be reached."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        failed_attempts = self._failed_attempts
        async with self._lock:
            if self._failed_attempts != failed_attempts:
                # Redis failed the attempt this one waited for (it may take seconds to time
                # out): fail now rather than each stream in turn. The next stream tries again.
                raise redis.ConnectionError(f"Redis at {self.url} did not take a subscription.")
            listeners = self._queues.setdefault(channel, set())
            listeners.add(queue)
            if channel not in self._confirmed:
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
                try:
                    if self._pubsub is None:
                        self._pubsub = self.client.pubsub()
                    await self._pubsub.subscribe(channel)
                except BaseException as exc:
                    if isinstance(exc, redis.RedisError | OSError):
                        self._failed_attempts += 1
                    # Cancelled too (the client went away): leave no listener behind.
                    self._forget(channel, queue)
                    raise
                reader = self._reader
                if reader is None or reader.done() or self._reader_pubsub is not self._pubsub:
                    self._reader_pubsub = self._pubsub
                    self._reader = asyncio.create_task(self._read(self._pubsub))
            confirmed = self._confirmed[channel]
            pubsub = self._pubsub
        try:
            # Once confirmed, nothing published on the channel can be missed.
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT)
        except (TimeoutError, redis.RedisError, OSError) as exc:
            await self.unsubscribe(channel, queue)
            if isinstance(exc, TimeoutError) and pubsub is not None:
                # Redis answers nothing on this connection (a link left half-open by a failover
                # or a network cut, for minutes): its streams reconnect, on a new one.
                logger.warning("Event streams: Redis did not confirm a subscription: %r", exc)
                await self._drop_everything(pubsub, exc)
            raise redis.ConnectionError(f"Subscription to {channel} failed: {exc!r}") from exc
        except asyncio.CancelledError:
            # Awaiting the unsubscribe here could be cancelled in turn: hand it to a task.
            self._forget_later(channel, queue)
            raise
        self.reachable = True
        return queue

    def _forget_later(self, channel: str, queue: asyncio.Queue[bytes | None]) -> None:
        task = asyncio.get_running_loop().create_task(self.unsubscribe(channel, queue))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def unsubscribe(self, channel: str, queue: asyncio.Queue[bytes | None]) -> None:
        async with self._lock:
            if self._forget(channel, queue) and self._pubsub is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._pubsub.unsubscribe(channel)

    def _forget(self, channel: str, queue: asyncio.Queue[bytes | None]) -> bool:
        """Drop one listener; True when it was the channel's last."""
        listeners = self._queues.get(channel)
        if listeners is None:
            return False
        listeners.discard(queue)
        if listeners:
            return False
        del self._queues[channel]
        confirmed = self._confirmed.pop(channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.cancel()
        return True

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while self._pubsub is pubsub:
                message = await pubsub.get_message(timeout=READ_TIMEOUT)
                if message is None:
                    continue
                channel = message["channel"]
                channel = channel.decode() if isinstance(channel, bytes) else channel
                if message["type"] == "subscribe":
                    confirmed = self._confirmed.get(channel)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
                elif message["type"] == "message":
                    for queue in self._queues.get(channel, ()):
                        queue.put_nowait(message["data"])
        except (redis.RedisError, OSError) as exc:
            logger.warning("Event streams lost their Redis subscription: %s", exc)
            await self._drop_everything(pubsub, exc)

    async def _drop_everything(self, pubsub: PubSub, exc: BaseException) -> None:
        async with self._lock:
            if self._pubsub is not pubsub:
                # Dropped already: the listeners there are now belong to a new connection.
                return
            self._pubsub = None
            self.reachable = False
            for listeners in self._queues.values():
                for queue in listeners:
                    queue.put_nowait(None)
            for confirmed in self._confirmed.values():
                if not confirmed.done():
                    confirmed.set_exception(redis.ConnectionError(str(exc)))
                    # Marks it retrieved: waiters see it, an unawaited one is not logged.
                    confirmed.exception()
            self._queues.clear()
            self._confirmed.clear()
            reader = self._reader if self._reader_pubsub is pubsub else None
        if reader is not None and reader is not asyncio.current_task():
            # Its pending read would hold the connection, which the pool hands out again.
            reader.cancel()
            await asyncio.wait([reader])
        with contextlib.suppress(redis.RedisError, OSError, RuntimeError):
            await pubsub.aclose()


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, EventHub]]
_hubs = weakref.WeakKeyDictionary()


def get_hub(url: str) -> EventHub:
    """The hub of the running event loop for the Redis at ``url``."""
    per_loop = _hubs.setdefault(asyncio.get_running_loop(), {})
    if url not in per_loop:
        per_loop[url] = EventHub(url)
    return per_loop[url]
