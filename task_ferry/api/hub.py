"""One Redis pub/sub connection per event loop, shared by every event stream it serves.

A stream subscribes to its job's channel here and gets a queue of the raw snapshots published
on it. However many streams follow however many jobs, the process holds one subscriber
connection and reads each publication once. When that connection is lost (an error, or no
PONG to the PING the hub sends when it is idle), the hub keeps its streams' listeners, tells
them, and subscribes their channels again on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import weakref
from collections.abc import Coroutine
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.client import PubSub

from task_ferry.stores.redis import redacted_url

logger = logging.getLogger("task_ferry")

__all__ = ["EventHub", "Link", "get_hub"]

# How long a subscription may take to be confirmed before the stream gives up on push.
SUBSCRIBE_TIMEOUT = 5.0
# Seconds the reader waits for a message before looking again (so it notices a lost link).
READ_TIMEOUT = 5.0
# Seconds without a message after which the reader PINGs Redis on its connection, and how long
# it waits for the PONG before giving the connection up: a link left half-open (a failover, a
# network cut) delivers nothing and raises nothing. (redis-py's ``health_check_interval`` PINGs
# a pub/sub connection too, but never minds a PONG that does not come.)
PING_INTERVAL = 10.0
PONG_TIMEOUT = 5.0
# Longest wait for Redis to take a command or answer one, reads of the reader aside.
SOCKET_TIMEOUT = 2.0
# First and longest pause between attempts to subscribe lost channels again, in seconds.
RESUBSCRIBE_DELAY = 0.25
RESUBSCRIBE_DELAY_MAX = 5.0
# Snapshot reads at a time by the streams of channels subscribed again.
REREADS = 8
# The most publications a stream keeps for its client, unsent: a client that stops reading
# (gone without closing its connection, say) holds its stream until TCP gives up, and each
# publication is a whole snapshot, so past this the oldest are dropped.
QUEUE_LIMIT = 64


class Link(enum.Enum):
    """What a listener's queue holds besides publications."""

    #: The subscriber connection was lost; the hub is subscribing the channel again.
    LOST = "lost"
    #: Subscribed again: whatever was published since ``LOST`` was missed.
    RESUBSCRIBED = "resubscribed"


def deliver(queue: asyncio.Queue[bytes | Link], data: bytes) -> None:
    """Put a publication in a stream's queue, dropping the oldest past ``QUEUE_LIMIT``: the
    newest snapshot says all the older ones did."""
    if queue.qsize() >= QUEUE_LIMIT:
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(data)


class EventHub:
    def __init__(self, url: str) -> None:
        self.url = url
        # A socket timeout too: a write to a dead link must not hold the lock for good.
        self.client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=SOCKET_TIMEOUT
        )
        self._pubsub: PubSub | None = None
        self._queues: dict[str, set[asyncio.Queue[bytes | Link]]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        # Subscriptions sent on the current connection and not answered yet, per channel: only
        # the answer to the last one confirms, and an answer beyond them is redis-py subscribing
        # again after a reconnection of its own.
        self._sent: dict[str, int] = {}
        # Channels whose listeners were told ``LOST``, until subscribed again.
        self._lost: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        # The connection the reader reads: a new connection needs a reader of its own.
        self._reader_pubsub: PubSub | None = None
        self._resubscriber: asyncio.Task[None] | None = None
        # Held while connecting and subscribing, which take seconds against a Redis that does
        # not answer: one attempt at a time.
        self._lock = asyncio.Lock()
        # Subscriptions that failed to reach Redis: the ones waiting for the lock meanwhile
        # fail with them.
        self._failed_attempts = 0
        # Work that a cancelled stream must not cut short, kept referenced until it is done.
        self._pending: set[asyncio.Task[None]] = set()
        #: False from a lost connection or a failed subscription until a subscription is
        #: confirmed, so that an outage is logged once, not once per stream.
        self.reachable = True
        #: Held by a stream reading its job's snapshot once subscribed again: the streams of a
        #: process all do at once, and each read holds a connection.
        self.rereads = asyncio.Semaphore(REREADS)

    async def subscribe(self, channel: str) -> asyncio.Queue[bytes | Link]:
        """A queue of what is published on ``channel`` from now on, and of ``Link`` changes.
        Raises ``redis.RedisError`` if Redis cannot be reached."""
        queue: asyncio.Queue[bytes | Link] = asyncio.Queue()
        failed_attempts = self._failed_attempts
        async with self._lock:
            if self._failed_attempts != failed_attempts:
                # Redis failed the attempt this one waited for (it may take seconds to time
                # out): fail now rather than each stream in turn. The next stream tries again.
                raise redis.ConnectionError(
                    f"Redis at {redacted_url(self.url)} did not take a subscription."
                )
            self._queues.setdefault(channel, set()).add(queue)
            try:
                # The channels lost with a connection too, while at it.
                await self._subscribe_unconfirmed([channel, *sorted(self._lost - {channel})])
            except BaseException:
                # Cancelled too (the client went away): leave no listener behind.
                self._forget(channel, queue)
                raise
            confirmed = self._confirmed[channel]
            pubsub = self._pubsub
        try:
            # Once confirmed, nothing published on the channel can be missed.
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT)
        except (TimeoutError, redis.RedisError, OSError) as exc:
            self._leave(channel, queue)
            if isinstance(exc, TimeoutError) and pubsub is not None:
                # Redis answers nothing on this connection (stalled, or a link left half-open
                # by a failover or a network cut): its streams go on, on a new one.
                logger.warning("Event streams: Redis did not confirm a subscription: %r", exc)
                await asyncio.shield(self._in_background(self._lose(pubsub, exc)))
            raise redis.ConnectionError(f"Subscription to {channel} failed: {exc!r}") from exc
        except asyncio.CancelledError:
            self._leave(channel, queue)
            raise
        self.reachable = True
        return queue

    async def _subscribe_unconfirmed(self, channels: list[str]) -> None:
        """Send the subscription of those of ``channels`` not subscribed or being subscribed
        on the current connection, connecting if need be. Called with the lock held."""
        needed = [channel for channel in channels if channel not in self._confirmed]
        if not needed:
            return
        loop = asyncio.get_running_loop()
        for channel in needed:
            self._confirmed[channel] = loop.create_future()
        try:
            if self._pubsub is None:
                self._pubsub = self.client.pubsub()
                self._sent.clear()
            await self._pubsub.subscribe(*needed)
        except BaseException as exc:
            if isinstance(exc, redis.RedisError | OSError):
                self._failed_attempts += 1
            for channel in needed:
                confirmed = self._confirmed.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.cancel()
            raise
        for channel in needed:
            self._sent[channel] = self._sent.get(channel, 0) + 1
        reader = self._reader
        if reader is None or reader.done() or self._reader_pubsub is not self._pubsub:
            self._reader_pubsub = self._pubsub
            self._reader = loop.create_task(self._read(self._pubsub))

    async def unsubscribe(self, channel: str, queue: asyncio.Queue[bytes | Link]) -> None:
        unsubscribing = self._leave(channel, queue)
        if unsubscribing is not None:
            # Cancelled meanwhile (the client went away), the unsubscribe goes on by itself.
            await asyncio.shield(unsubscribing)

    def _leave(self, channel: str, queue: asyncio.Queue[bytes | Link]) -> asyncio.Task[None] | None:
        """Forget a listener at once (no wait for the lock, so no cancellation can keep it);
        when it was the channel's last, unsubscribe from Redis in a task of its own."""
        if not self._forget(channel, queue):
            return None
        return self._in_background(self._unsubscribe_channel(channel))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _unsubscribe_channel(self, channel: str) -> None:
        async with self._lock:
            # A stream that subscribed it again meanwhile keeps it.
            if channel not in self._queues and self._pubsub is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._pubsub.unsubscribe(channel)

    def _forget(self, channel: str, queue: asyncio.Queue[bytes | Link]) -> bool:
        """Drop one listener; True when it was the channel's last."""
        listeners = self._queues.get(channel)
        if listeners is None:
            return False
        listeners.discard(queue)
        if listeners:
            return False
        del self._queues[channel]
        self._lost.discard(channel)
        confirmed = self._confirmed.pop(channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.cancel()
        return True

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard_at = loop.time()
        # When the PING that no message has answered yet was sent.
        pinged_at: float | None = None
        try:
            while self._pubsub is pubsub:
                now = loop.time()
                if pinged_at is not None and now >= pinged_at + PONG_TIMEOUT:
                    raise redis.TimeoutError(f"Redis did not answer a PING in {PONG_TIMEOUT} s.")
                if pinged_at is None and now >= heard_at + PING_INTERVAL:
                    await pubsub.ping()
                    pinged_at = now = loop.time()
                wake_at = (
                    heard_at + PING_INTERVAL if pinged_at is None else pinged_at + PONG_TIMEOUT
                )
                message = await pubsub.get_message(timeout=min(READ_TIMEOUT, wake_at - now))
                if message is None:
                    continue
                # Whatever arrives shows the link carries data, the PONG or anything else.
                heard_at = loop.time()
                pinged_at = None
                if message["type"] == "pong":
                    continue
                channel = message["channel"]
                channel = channel.decode() if isinstance(channel, bytes) else channel
                if message["type"] == "subscribe":
                    sent = self._sent.pop(channel, 0)
                    if sent > 1:
                        # Answers an earlier subscription: an unsubscribe sent after it may
                        # not have reached Redis yet, so only the last one's answer confirms.
                        self._sent[channel] = sent - 1
                        continue
                    confirmed = self._confirmed.get(channel)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
                    # Not sent by the hub: redis-py reconnected by itself and subscribed the
                    # channel again, and what was published in between was missed all the same.
                    if channel in self._lost or not sent:
                        self._lost.discard(channel)
                        self.reachable = True
                        for queue in self._queues.get(channel, ()):
                            queue.put_nowait(Link.RESUBSCRIBED)
                elif message["type"] == "message":
                    for queue in self._queues.get(channel, ()):
                        deliver(queue, message["data"])
        except (redis.RedisError, OSError) as exc:
            logger.warning("Event streams lost their Redis subscription: %s", exc)
            await self._lose(pubsub, exc)

    async def _lose(self, pubsub: PubSub, exc: BaseException) -> None:
        """Give up ``pubsub``: its confirmed channels are subscribed again on a new connection,
        the subscriptions still waiting for Redis fail."""
        async with self._lock:
            if self._pubsub is not pubsub:
                # Lost already: the subscriptions there are now belong to a new connection.
                return
            self._pubsub = None
            self.reachable = False
            # What silenced this connection (a network cut, a failover) silenced the pool's
            # idle ones too: the snapshot reads after subscribing again would wait out their
            # timeout on them. Before the lock is let go, so no new subscription takes one;
            # the connections in use are left to finish their commands (or time out).
            with contextlib.suppress(redis.RedisError, OSError):
                await self.client.connection_pool.disconnect(inuse_connections=False)
            for channel, listeners in self._queues.items():
                confirmed = self._confirmed.get(channel)
                if channel in self._lost or confirmed is None:
                    continue
                if confirmed.done():
                    self._lost.add(channel)
                    for queue in listeners:
                        queue.put_nowait(Link.LOST)
            for confirmed in self._confirmed.values():
                if not confirmed.done():
                    confirmed.set_exception(redis.ConnectionError(str(exc)))
                    # Marks it retrieved: waiters see it, an unawaited one is not logged.
                    confirmed.exception()
            self._confirmed.clear()
            reader = self._reader if self._reader_pubsub is pubsub else None
            resubscriber = self._resubscriber
            if self._lost and (resubscriber is None or resubscriber.done()):
                self._resubscriber = asyncio.get_running_loop().create_task(self._resubscribe())
        if reader is not None and reader is not asyncio.current_task():
            # Its pending read would hold the connection, which the pool hands out again.
            reader.cancel()
            await asyncio.wait([reader])
        with contextlib.suppress(redis.RedisError, OSError, RuntimeError):
            await pubsub.aclose()

    async def _resubscribe(self) -> None:
        """Subscribe the lost channels again, with a growing pause between attempts, until
        none is left (subscribed again, or their streams ended)."""
        delay = RESUBSCRIBE_DELAY
        while self._lost:
            # Spread, so that the processes of a fleet do not come back in the same instant.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(2 * delay, RESUBSCRIBE_DELAY_MAX)
            async with self._lock:
                channels = sorted(self._lost)
                try:
                    await self._subscribe_unconfirmed(channels)
                except (redis.RedisError, OSError):
                    continue
                # Not those whose streams ended meanwhile.
                waiting = [self._confirmed[channel] for channel in self._lost]
                pubsub = self._pubsub
            if not waiting:
                continue
            # Not cancelled by the timeout: a late confirmation still counts.
            _, unconfirmed = await asyncio.wait(waiting, timeout=SUBSCRIBE_TIMEOUT)
            if unconfirmed and pubsub is not None:
                await self._lose(pubsub, TimeoutError("no confirmation"))

    async def aclose(self) -> None:
        """Stop reading and resubscribing, and close the connections (tests, shutdown)."""
        tasks = [task for task in (self._reader, self._resubscriber) if task is not None]
        for task in tasks:
            task.cancel()
        # Before the connections close under them: a reader left reconnecting there may not
        # take its cancellation at the loop's end.
        if waiting := [*tasks, *self._pending]:
            await asyncio.wait(waiting)
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError, RuntimeError):
                await self._pubsub.aclose()
        await self.client.aclose()


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, EventHub]]
_hubs = weakref.WeakKeyDictionary()


def get_hub(url: str) -> EventHub:
    """The hub of the running event loop for the Redis at ``url``."""
    per_loop = _hubs.setdefault(asyncio.get_running_loop(), {})
    if url not in per_loop:
        per_loop[url] = EventHub(url)
    return per_loop[url]
