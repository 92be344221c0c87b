"""``GET /<id>/events/``: a job's changes as Server-Sent Events, pushed through Redis pub/sub.

Under ASGI with the Redis progress store, one stream holds one Redis subscription and no
thread. Under WSGI, or with a store that cannot push, the endpoint answers the current state
once with a ``retry`` delay, so ``EventSource`` polls by reconnecting.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import functools
import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import redis
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db import DatabaseError, connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from rest_framework.exceptions import NotFound
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from task_ferry.api.hub import EventHub, Link, get_hub
from task_ferry.api.permissions import IsJobOwner, get_permission_class
from task_ferry.api.serializers import is_final, public_job
from task_ferry.api.views import visible_snapshot
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import JobDoesNotExist
from task_ferry.handler import job_row_exists, parse_job_id
from task_ferry.models import Job, JobState, jobs_database
from task_ferry.snapshot import job_snapshot
from task_ferry.stores.base import get_store
from task_ferry.stores.redis import RedisProgressStore

__all__ = ["job_events"]

logger = logging.getLogger("task_ferry")

T = TypeVar("T")

# Reconnect delay for a live stream that ended (lifetime over, Redis hiccup), in ms.
LIVE_RETRY_MS = 1000
# Reconnect delay of the polling fallback, in ms: the poll interval.
POLL_RETRY_MS = 2000
# Seconds a live stream waits for the hub to subscribe again after losing Redis, before it
# ends with ``reconnect`` (its client then polls the database until Redis is back).
OUTAGE_LIMIT = 15.0
KEEPALIVE = b": keep-alive\n\n"


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def job_event(snapshot: dict[str, Any]) -> bytes:
    """The ``job`` event of a snapshot, followed by ``end`` when the job is over."""
    event = sse_event("job", public_job(snapshot))
    if is_final(snapshot):
        event += sse_event("end", {"state": snapshot["state"]})
    return event


def retry_field(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


class FirstRendererNegotiation(BaseContentNegotiation):
    """``EventSource`` asks for ``text/event-stream``; errors are answered in JSON anyway."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        return next(iter(parsers), None)


class JobEventsAccess(APIView):
    """Authenticates the request and finds the job the way the other endpoints do. Answers
    the DRF error response, or a 200 whose ``snapshot`` attribute is the job's snapshot."""

    renderer_classes = [JSONRenderer]
    content_negotiation_class = FirstRendererNegotiation
    schema = None

    def get_permissions(self) -> list[Any]:
        return [get_permission_class()()]

    def get(self, request: Request, pk: str, **kwargs: Any) -> Response:
        policy: IsJobOwner = self.get_permissions()[0]
        try:
            job_id = parse_job_id(pk)
        except JobDoesNotExist as exc:
            raise NotFound(str(exc)) from exc
        response = Response()
        response.snapshot = visible_snapshot(policy, request, job_id, pk)  # type: ignore[attr-defined]
        return response


_access_view = JobEventsAccess.as_view()


def check_access(
    request: HttpRequest, pk: str, **kwargs: Any
) -> tuple[HttpResponseBase | None, Any]:
    try:
        # The URL's other arguments (a ``version`` in the API's prefix) are DRF's to read.
        response = _access_view(request, pk=pk, **kwargs)
    finally:
        if isinstance(request, ASGIRequest):
            # The stream needs no database: do not hold a connection for its lifetime.
            release_connections()
    snapshot = getattr(response, "snapshot", None)
    if snapshot is None:
        response.render()
        return response, None
    return None, snapshot


_access_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="task-ferry-events")


def release_connections() -> None:
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close()


def read_row(job_id: int, read: Callable[[int], T], unknown: T) -> T:
    """``read(job_id)`` on the jobs' database from a stream's thread; ``unknown`` when the
    database cannot tell (the stream goes on as it would have)."""
    try:
        return read(job_id)
    except DatabaseError as exc:
        logger.warning("Event stream of job %s: could not read its row: %s", job_id, exc)
        return unknown
    finally:
        release_connections()


def row_exists(job_id: int) -> bool:
    """``job_row_exists()``, True when the database cannot tell."""
    return read_row(job_id, job_row_exists, True)


row_exists_async = sync_to_async(row_exists, thread_sensitive=False, executor=_access_executor)


def row_snapshot(job_id: int) -> dict[str, Any] | None:
    """The job's snapshot built from its row, read where jobs are written; None when the row
    is gone, and ``{}`` when the database cannot tell."""
    unknown: dict[str, Any] | None = {}
    return read_row(job_id, snapshot_from_row, unknown)


def snapshot_from_row(job_id: int) -> dict[str, Any] | None:
    job = Job._base_manager.using(jobs_database()).filter(pk=job_id).first()
    return None if job is None else job_snapshot(job.specific)


row_snapshot_async = sync_to_async(row_snapshot, thread_sensitive=False, executor=_access_executor)


def running_since(snapshot: dict[str, Any]) -> datetime.datetime | None:
    """When a running job's snapshot was made (its worker stamps each one); None in any other
    state."""
    if snapshot.get("state") != JobState.STARTED or not snapshot.get("updated_at"):
        return None
    return datetime.datetime.fromisoformat(snapshot["updated_at"])


# The stream's last event when its job was deleted: as final as a 404 of the job would be.
DELETED_EVENT = sse_event("end", {"state": None, "deleted": True})
# The stream's last event when Redis stayed away past ``OUTAGE_LIMIT``: not an end, the client
# reconnects.
REDIS_LOST_EVENT = sse_event("reconnect", {"reason": "redis-unavailable"})


@functools.lru_cache(maxsize=64)
def render_published(raw: bytes) -> tuple[bytes, bool, datetime.datetime | None]:
    """The events of a published snapshot (or of the store's deletion notice), rendered once
    for all the streams that get it, whether it is final, and its ``running_since``."""
    snapshot = json.loads(raw)
    if snapshot.get("deleted") is True:
        return DELETED_EVENT, True, None
    return job_event(snapshot), is_final(snapshot), running_since(snapshot)


class StreamSlot:
    """One of the live streams a user may hold open in this process
    (``SSE_MAX_STREAMS_PER_USER``), from its opening until its stream ends."""

    def __init__(self, viewer: str) -> None:
        self.viewer = viewer
        self.held = True
        _open_streams[viewer] += 1

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _open_streams[self.viewer] -= 1
        if not _open_streams[self.viewer]:
            del _open_streams[self.viewer]


# Live streams open in this process, by user; touched only on the event loop's thread.
_open_streams: collections.Counter[str] = collections.Counter()


def take_stream_slot(user: Any) -> StreamSlot | bool:
    """A slot for one more live stream of ``user``, True when no limit applies to them, False
    when they hold ``SSE_MAX_STREAMS_PER_USER`` streams already (answered as a poll, so that
    one client cannot hold a process's connections)."""
    limit = ferry_settings.SSE_MAX_STREAMS_PER_USER
    viewer = getattr(user, "pk", None) if getattr(user, "is_authenticated", False) else None
    if limit is None or viewer is None:
        return True
    if _open_streams[str(viewer)] >= limit:
        return False
    return StreamSlot(str(viewer))


async def open_live_stream(
    store: RedisProgressStore,
    job_id: int,
    first: dict[str, Any],
    slot: StreamSlot | None = None,
) -> AsyncIterator[bytes] | None:
    """The job's live stream, subscribed and with its first event ready; None when Redis
    cannot be reached (the caller answers the polling fallback instead). ``slot`` is released
    when the stream ends."""
    hub = get_hub(store.url)
    channel = store.events_channel(job_id)
    try:
        queue = await hub.subscribe(channel)
    except (redis.RedisError, OSError) as exc:
        # Once per outage: every client reconnects to the fallback every few seconds.
        if hub.reachable:
            hub.reachable = False
            logger.warning("Event streams fall back to polling without Redis: %s", exc)
        return None
    events = live_events(hub, store, job_id, channel, queue, first, slot=slot)
    # Started here, so its unsubscribing runs however the response ends, even if never sent.
    opening = await anext(events)
    return prepend(opening, events)


async def prepend(chunk: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    try:
        yield chunk
        async for more in rest:
            yield more
    finally:
        await rest.aclose()


async def live_events(
    hub: EventHub,
    store: RedisProgressStore,
    job_id: int,
    channel: str,
    queue: asyncio.Queue[bytes | Link],
    first: dict[str, Any],
    *,
    slot: StreamSlot | None = None,
) -> AsyncGenerator[bytes, None]:
    """The stream of a subscribed ``queue``: current state, then every published snapshot
    until the job ends. Unsubscribes, and releases ``slot``, when it ends."""
    keepalive = float(ferry_settings.SSE_KEEPALIVE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(ferry_settings.SSE_MAX_DURATION)
    try:
        # Read after subscribing, so no change falls between the two.
        last_raw = await read_snapshot(hub, store, job_id)
        if last_raw is None and not await row_exists_async(job_id):
            # Deleted since the access check, its store's notice published before this stream
            # subscribed: the stream would wait for a change that never comes.
            yield retry_field(LIVE_RETRY_MS) + DELETED_EVENT
            return
        snapshot = first if last_raw is None else json.loads(last_raw)
        shown = running_since(snapshot)
        yield retry_field(LIVE_RETRY_MS) + job_event(snapshot)
        if is_final(snapshot):
            return
        next_keepalive = loop.time() + keepalive
        # Set while the hub has lost Redis: when the stream gives up waiting for it.
        give_up_at: float | None = None
        while (now := loop.time()) < deadline:
            if give_up_at is not None and now >= give_up_at:
                # Redis stays away: every stream of this process ends about now, and their
                # clients reconnect spread over a second, not all in the same millisecond.
                yield (
                    retry_field(LIVE_RETRY_MS + random.randrange(LIVE_RETRY_MS)) + REDIS_LOST_EVENT
                )
                return
            if now >= next_keepalive:
                yield KEEPALIVE
                next_keepalive = now + keepalive
            wake_at = min(next_keepalive, deadline, give_up_at or deadline)
            try:
                item = await asyncio.wait_for(queue.get(), wake_at - now)
            except TimeoutError:
                continue
            if item is Link.LOST:
                give_up_at = give_up_at or loop.time() + OUTAGE_LIMIT
                continue
            if item is Link.RESUBSCRIBED:
                give_up_at = None
                # Changes published while the channel was not subscribed were missed: the
                # store's snapshot has the newest of them.
                async with hub.rereads:
                    raw = await read_snapshot(hub, store, job_id)
                    # Unless the store has the job's end, its row too: a job that ended
                    # meanwhile may have had its final publication refused (Redis restarted
                    # empty) or timed out (Redis stalled, its older snapshot kept).
                    ended = raw is not None and render_published(raw)[1]
                    row = {} if ended else await row_snapshot_async(job_id)
                if row is None:
                    yield DELETED_EVENT
                    return
                if row and is_final(row):
                    yield job_event(row)
                    return
                if raw is None:
                    # A running job's worker publishes it again.
                    continue
            else:
                raw = item
            # The snapshot read after subscribing may also arrive as a message.
            if raw == last_raw:
                continue
            event, final, made_at = render_published(raw)
            if made_at is not None:
                # Published before the snapshot read after subscribing, which the stream has
                # sent already. (Not its percentage: that can go back, see docs/progress.md.)
                if shown is not None and made_at < shown:
                    continue
                shown = made_at
            last_raw = raw
            yield event
            next_keepalive = loop.time() + keepalive
            if final:
                return
    finally:
        if slot is not None:
            slot.release()
        await hub.unsubscribe(channel, queue)


async def read_snapshot(hub: EventHub, store: RedisProgressStore, job_id: int) -> bytes | None:
    """The job's snapshot as stored, None when it is not there or Redis does not answer."""
    try:
        return cast("bytes | None", await hub.client.get(store.snapshot_key(job_id)))
    except (redis.RedisError, OSError):
        return None


def event_stream_response(content: Any, mode: str) -> HttpResponseBase:
    response_class = StreamingHttpResponse if mode == "live" else HttpResponse
    response: HttpResponseBase = response_class(content, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    # Keep nginx from buffering the stream.
    response["X-Accel-Buffering"] = "no"
    response["X-Task-Ferry-Stream"] = mode
    return response


class EveryDatabase(frozenset[str]):
    """Contains every database alias."""

    def __contains__(self, alias: object) -> bool:
        return True


async def job_events(request: HttpRequest, pk: str, **kwargs: Any) -> HttpResponseBase:
    """``GET /<id>/events/``. See docs/api.md for the event format. ``kwargs`` are the other
    arguments of the URL the API is mounted under (``api/<version>/jobs/``)."""
    if isinstance(request, ASGIRequest):
        # A few threads, so a burst of new streams opens a few database connections at most.
        check = sync_to_async(check_access, thread_sensitive=False, executor=_access_executor)
    else:
        check = sync_to_async(check_access)
    error, snapshot = await check(request, pk, **kwargs)
    if error is not None:
        return error
    store = get_store()
    if (
        isinstance(request, ASGIRequest)
        and request.method != "HEAD"  # headers only: no stream to hold open
        and isinstance(store, RedisProgressStore)
        and not is_final(snapshot)
        and (slot := take_stream_slot(getattr(request, "user", None)))
    ):
        held = slot if isinstance(slot, StreamSlot) else None
        stream = None
        try:
            stream = await open_live_stream(store, snapshot["id"], snapshot, held)
        finally:
            if stream is None and held is not None:
                held.release()
        if stream is not None:
            return event_stream_response(stream, "live")
    # One answer, not a stream (the polling fallback, or a job that has ended already): its
    # retry field and its header both say poll.
    return event_stream_response(retry_field(POLL_RETRY_MS) + job_event(snapshot), "poll")


# Django refuses ATOMIC_REQUESTS for an async view, and the stream must hold no transaction
# anyway: exempt it on every database, as ``transaction.non_atomic_requests`` does for one.
job_events._non_atomic_requests = EveryDatabase()  # type: ignore[attr-defined]
