"""``GET /<id>/events/``: Server-Sent Events under ASGI, the polling fallback under WSGI."""

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import threading
import time
import urllib.parse

import httpx
import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.db import connection
from django.test import AsyncClient, Client

from task_ferry.api import events as events_module
from task_ferry.api import hub as hub_module
from task_ferry.api.events import LIVE_RETRY_MS, POLL_RETRY_MS
from task_ferry.api.hub import EventHub, Link
from task_ferry.handler import JobHandler, publish, transition
from task_ferry.models import Job, JobState
from task_ferry.snapshot import job_snapshot
from task_ferry.stores.base import get_store
from tests.api.helpers import create, needs_redis, start
from tests.api.live import uvicorn_server
from tests.api.sse import parse_events


def without_comments(text):
    """``parse_events(text)`` with the keep-alive comments left out."""
    return [(name, data) for name, data in parse_events(text) if name != "comment"]


def states_shown(text):
    """The event name and job state of each event of SSE text, comments left out."""
    return [(name, data["state"]) for name, data in without_comments(text)]


def url(job):
    return f"/api/jobs/{job.pk}/events/"


def test_under_wsgi_the_stream_answers_once_and_polls_by_retry(user, hold):
    client = Client()
    client.force_login(user)
    job = start(create(user, steps=4), percentage=50, label="half")
    response = client.get(url(job), HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["X-Task-Ferry-Stream"] == "poll"
    assert response["Cache-Control"] == "no-cache"
    events = parse_events(response.content.decode())
    assert events[0] == ("retry", 2000)
    name, data = events[1]
    assert name == "job"
    assert (data["id"], data["state"], data["progress_percentage"]) == (job.pk, "started", 50)
    assert data["steps"] == 4 and "user_id" not in data and "fields" not in data
    assert len(events) == 2


def test_the_stream_of_an_ended_job_sends_its_final_state_and_end(user):
    client = Client()
    client.force_login(user)
    job = create(user, steps=2)
    response = client.get(url(job))
    events = parse_events(response.content.decode())
    assert [name for name, _ in events] == ["retry", "job", "end"]
    assert events[1][1]["state"] == "finished"
    assert events[2][1] == {"state": "finished"}
    # A single snapshot: the header and the retry field both say so (docs/api.md).
    assert response["X-Task-Ferry-Stream"] == "poll"
    assert events[0] == ("retry", POLL_RETRY_MS)


@needs_redis
def test_under_asgi_the_stream_of_an_ended_job_is_one_answer_marked_poll(transactional_db, user):
    job = create(user, steps=2)

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        return await client.get(url(job))

    response = run_async(scenario)
    assert response["X-Task-Ferry-Stream"] == "poll"
    assert not response.streaming
    events = parse_events(response.content.decode())
    assert events[0] == ("retry", POLL_RETRY_MS)
    assert [name for name, _ in events[1:]] == ["job", "end"]


def run_async(scenario, timeout=15):
    """Run a scenario with Django's AsyncClient, closing the DB connection its sync thread
    opened (the test client keeps Django from closing it at request end)."""

    async def wrapped():
        try:
            return await asyncio.wait_for(scenario(), timeout)
        finally:
            await sync_to_async(lambda: connection.close())()

    return asyncio.run(wrapped())


async def read_until_closed(response, *, timeout=10.0):
    chunks = []

    async def consume():
        async for chunk in response.streaming_content:
            chunks.append(chunk.decode())

    await asyncio.wait_for(consume(), timeout)
    return "".join(chunks)


@needs_redis
def test_under_asgi_every_change_is_pushed_until_the_end(transactional_db, user, store, hold):
    job = start(create(user, steps=4))
    changes = []
    for step in range(1, 5):
        snapshot = job_snapshot(job)
        snapshot.update(progress_percentage=step * 25, progress_state=f"step {step}")
        changes.append(snapshot)
    changes[-1]["state"] = "finished"

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(url(job))
        assert response.status_code == 200
        assert response["X-Task-Ferry-Stream"] == "live"
        stream = response.streaming_content
        first = (await anext(stream)).decode()
        for change in changes:
            store.write(job.pk, change)
        rest = []
        async for chunk in stream:
            rest.append(chunk.decode())
        return first, "".join(rest)

    first, rest = run_async(scenario)
    head = parse_events(first)
    assert head[0] == ("retry", 1000)
    assert head[1][0] == "job" and head[1][1]["state"] == "started"
    events = parse_events(rest)
    assert [(n, d.get("progress_percentage")) for n, d in events] == [
        ("job", 25),
        ("job", 50),
        ("job", 75),
        ("job", 100),
        ("end", None),
    ]
    assert events[3][1]["state"] == "finished" and events[4][1] == {"state": "finished"}
    assert events[0][1]["progress_state"] == "step 1" and events[0][1]["steps"] == 4


@needs_redis
def test_the_stream_of_a_job_deleted_while_it_is_followed_ends_as_a_404_would(
    transactional_db, user, hold
):
    """The store forgot the job's snapshot and announced nothing: the stream went on with
    keep-alives until ``SSE_MAX_DURATION`` (five minutes), showing a job that was gone."""
    job = start(create(user, steps=4), percentage=25)

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(url(job))
        assert response["X-Task-Ferry-Stream"] == "live"
        stream = response.streaming_content
        head = (await anext(stream)).decode()
        # The owner's account deleted, say: the delete commits, and the store forgets the job.
        await sync_to_async(lambda: Job.objects.filter(pk=job.pk).delete())()
        began = time.monotonic()
        rest = "".join([chunk.decode() async for chunk in stream])
        took = time.monotonic() - began
        again = await client.get(url(job))
        return head, rest, took, again.status_code

    head, rest, took, again = run_async(scenario)
    assert parse_events(head)[1][1]["progress_percentage"] == 25
    # ``end``, which clients close their EventSource on; the job is no longer there to show.
    assert parse_events(rest) == [("end", {"state": None, "deleted": True})]
    assert took < 3
    assert again == 404


@needs_redis
@pytest.mark.parametrize("state", ["pending", "started"])
def test_a_job_deleted_while_its_stream_opens_ends_the_stream_as_deleted(
    transactional_db, user, hold, settings, state, monkeypatch
):
    """A job deleted after the stream's access check, before it subscribed to the job's
    channel: the store's deletion notice went out to no one, and the stream showed the job
    with keep-alives until ``SSE_MAX_DURATION`` (five minutes)."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "SSE_MAX_DURATION": 3}
    job = create(user, steps=4)
    if state == "started":
        start(job, percentage=25)
    after_access_check(monkeypatch, lambda: Job.objects.filter(pk=job.pk).delete())

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(url(job))
        assert response["X-Task-Ferry-Stream"] == "live"
        began = time.monotonic()
        text = await read_until_closed(response)
        return text, time.monotonic() - began

    text, took = run_async(scenario)
    assert parse_events(text) == [("retry", 1000), ("end", {"state": None, "deleted": True})]
    assert took < 1
    # The stream left the job's channel.
    assert numsub_once_settled(get_store().client, get_store().events_channel(job.pk)) == 0


def after_access_check(monkeypatch, action):
    """Run ``action`` between a stream's access check and its subscription, in the access
    check's thread."""
    check_access = events_module.check_access

    def check_then_act(request, pk):
        answer = check_access(request, pk)
        try:
            action()
        finally:
            events_module.release_connections()
        return answer

    monkeypatch.setattr(events_module, "check_access", check_then_act)


@needs_redis
def test_a_stream_whose_job_the_store_lost_while_it_opened_follows_the_job(
    transactional_db, user, hold, store, monkeypatch
):
    """A snapshot gone from the store (expired, or Redis restarted empty) is no deletion: the
    stream finds the job's row and follows the job from the state its access check read."""
    job = start(create(user, steps=4), percentage=25)
    finished = {**job_snapshot(job), "state": "finished", "progress_percentage": 100}
    after_access_check(monkeypatch, lambda: store.client.delete(store.snapshot_key(job.pk)))

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(url(job))
        stream = response.streaming_content
        head = (await anext(stream)).decode()
        await sync_to_async(store.write)(job.pk, finished)
        rest = "".join([chunk.decode() async for chunk in stream])
        return head, rest

    head, rest = run_async(scenario)
    assert parse_events(head)[1][1]["progress_percentage"] == 25
    assert [(name, data.get("state")) for name, data in parse_events(rest)] == [
        ("job", "finished"),
        ("end", "finished"),
    ]


@needs_redis
def test_the_stream_sends_keep_alives_and_closes_after_its_lifetime(
    transactional_db, user, hold, settings
):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "SSE_KEEPALIVE": 0.1, "SSE_MAX_DURATION": 0.6}
    job = start(create(user, steps=4))

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(url(job))
        began = time.monotonic()
        text = await read_until_closed(response)
        return text, time.monotonic() - began

    text, took = run_async(scenario)
    events = parse_events(text)
    assert [n for n, _ in events[:2]] == ["retry", "job"]
    assert events[2:] and all(e == ("comment", "keep-alive") for e in events[2:])
    assert len(events[2:]) >= 3
    assert 0.5 <= took < 3


@needs_redis
def test_under_asgi_head_answers_at_once_without_subscribing(transactional_db, user, hold):
    job = start(create(user, steps=4))

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.head(url(job))
        hub = hub_module.get_hub(django_settings.TASK_FERRY["REDIS_URL"])
        return response, dict(hub._queues)

    response, listeners = run_async(scenario)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["X-Task-Ferry-Stream"] == "poll"
    assert not response.streaming
    assert listeners == {}


@needs_redis
def test_under_asgi_others_and_anonymous_get_json_errors(transactional_db, user, other_user, hold):
    job = start(create(other_user, steps=4))

    async def scenario():
        mine = AsyncClient()
        await mine.aforce_login(user)
        return await mine.get(url(job)), await AsyncClient().get(url(job))

    foreign, anonymous = run_async(scenario)
    assert foreign.status_code == 404 and "detail" in foreign.json()
    assert anonymous.status_code == 403 and "detail" in anonymous.json()


def run_in_thread(job_id):
    try:
        JobHandler.run_job(job_id)
    finally:
        connection.close()


@needs_redis
@pytest.mark.worker
def test_uvicorn_streams_every_published_change_of_a_running_job(transactional_db, user, hold):
    client = Client()
    client.force_login(user)
    cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    job = JobHandler.create_and_start(user, "scripted", steps=6, tick_delay=0.15)
    with uvicorn_server(DJANGO_SETTINGS_MODULE="tests.settings_live") as base:
        # Everything the worker publishes, as Redis delivers it, to compare with.
        channel = redis.Redis.from_url(django_settings.TASK_FERRY["REDIS_URL"]).pubsub()
        channel.subscribe(get_store().events_channel(job.pk))
        received = []
        http = httpx.Client(base_url=base, cookies={"sessionid": cookie}, timeout=20)
        with http, http.stream("GET", url(job)) as response:
            assert response.status_code == 200
            assert response.headers["x-task-ferry-stream"] == "live"
            chunks = response.iter_text()
            received.append(next(chunks))
            runner = threading.Thread(target=run_in_thread, args=(job.pk,))
            runner.start()
            received.extend(chunks)
            runner.join()
        published = []
        while (message := channel.get_message(timeout=0.5)) is not None:
            if message["type"] == "message":
                published.append(json.loads(message["data"]))
        channel.close()
    events = parse_events("".join(received))
    states = [(d["state"], d["progress_percentage"]) for n, d in events if n == "job"]
    assert states[0] == ("pending", 0)
    assert states[1:] == [(p["state"], p["progress_percentage"]) for p in published]
    assert ("started", 50) in states and states[-1] == ("finished", 100)
    assert events[-1] == ("end", {"state": "finished"})


@needs_redis
def test_concurrent_streams_share_one_subscription_and_each_get_their_jobs_changes(
    transactional_db, user, store, hold
):
    from task_ferry.api.hub import get_hub

    first, second = start(create(user, steps=2)), start(create(user, steps=2))

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        responses = [await client.get(url(job)) for job in (first, first, second)]
        streams = [r.streaming_content for r in responses]
        heads = [await anext(stream) for stream in streams]
        hub = get_hub(django_settings.TASK_FERRY["REDIS_URL"])
        listeners = {channel: len(queues) for channel, queues in hub._queues.items()}
        for job in (first, second):
            final = job_snapshot(job)
            final.update(state="finished", progress_percentage=100)
            store.write(job.pk, final)
        tails = []
        for stream in streams:
            tails.append("".join([chunk.decode() async for chunk in stream]))
        return heads, listeners, tails, dict(hub._queues)

    _, listeners, tails, left = run_async(scenario)
    assert sorted(listeners.values()) == [1, 2]
    for job, tail in zip((first, first, second), tails, strict=True):
        events = parse_events(tail)
        assert [name for name, _ in events] == ["job", "end"]
        assert events[0][1]["id"] == job.pk and events[0][1]["state"] == "finished"
    assert left == {}


@needs_redis
def test_a_user_holds_at_most_sse_max_streams_per_user_live_streams_and_more_are_polls(
    transactional_db, user, other_user, store, hold, settings
):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "SSE_MAX_STREAMS_PER_USER": 2}
    first, second = start(create(user, steps=2)), start(create(user, steps=2))
    theirs = start(create(other_user, steps=2))

    def finish(job):
        final = job_snapshot(job)
        final.update(state="finished", progress_percentage=100)
        store.write(job.pk, final)

    async def scenario():
        mine, stranger = AsyncClient(), AsyncClient()
        await mine.aforce_login(user)
        await stranger.aforce_login(other_user)
        held = [await mine.get(url(job)) for job in (first, second)]
        streams = [response.streaming_content for response in held]
        for stream in streams:
            await anext(stream)
        over = await mine.get(url(second))
        others = await stranger.get(url(theirs))
        # A stream that ends gives its place back.
        finish(first)
        async for _ in streams[0]:
            pass
        again = await mine.get(url(second))
        modes = [r["X-Task-Ferry-Stream"] for r in (*held, over, others, again)]
        finish(second)
        finish(theirs)
        for response in (held[1], others, again):
            await read_until_closed(response)
        return modes, over, dict(events_module._open_streams)

    modes, over, left = run_async(scenario)
    assert modes == ["live", "live", "poll", "live", "live"]
    assert over.status_code == 200
    events = parse_events(over.content.decode())
    assert events[0] == ("retry", POLL_RETRY_MS)
    assert events[1][0] == "job" and events[1][1]["id"] == second.pk
    assert left == {}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_a_stream_ends_with_reconnect_when_redis_stays_away_and_the_next_one_polls(
    transactional_db, user, hold, redis_server, monkeypatch
):
    monkeypatch.setattr(events_module, "OUTAGE_LIMIT", 1.0)
    job = start(create(user, steps=2), percentage=50)

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(url(job))
        stream = response.streaming_content
        head = (await anext(stream)).decode()
        redis_server.stop()
        began = time.monotonic()
        rest = "".join([chunk.decode() async for chunk in stream])
        took = time.monotonic() - began
        again = await client.get(url(job))
        return head, rest, took, again, again.content.decode()

    head, rest, took, again, body = run_async(scenario)
    assert parse_events(head)[1][1]["progress_percentage"] == 50
    # Not ``end``: the job goes on. The client is told to reconnect, and why.
    assert [name for name, _ in parse_events(rest)] == ["retry", "reconnect"]
    assert parse_events(rest)[1][1] == {"reason": "redis-unavailable"}
    assert 1 <= took < 3
    # Every stream of the process ends at once: their clients come back spread over a second.
    (retry,) = [value for name, value in parse_events(rest) if name == "retry"]
    assert LIVE_RETRY_MS <= retry < 2 * LIVE_RETRY_MS
    assert again.status_code == 200
    # Without Redis there is no subscription: the answer says it is the polling fallback.
    assert again["X-Task-Ferry-Stream"] == "poll"
    events = parse_events(body)
    assert events[0] == ("retry", 2000)
    # The progress was only in the store (as mid-transaction progress is): this is the row.
    data = events[1][1]
    assert (data["id"], data["state"], data["progress_percentage"]) == (job.pk, "started", 0)
    assert len(events) == 2


@needs_redis
def test_a_stream_whose_client_stops_reading_keeps_only_the_newest_publications():
    """Its queue grew without end: every snapshot published while the client read nothing."""

    async def scenario():
        hub = EventHub(django_settings.TASK_FERRY["REDIS_URL"])
        channel = "tf-tests:events:unread"
        try:
            queue = await hub.subscribe(channel)
            for number in range(hub_module.QUEUE_LIMIT * 3):
                await hub.client.publish(channel, str(number).encode())
            last = str(hub_module.QUEUE_LIMIT * 3 - 1).encode()
            while True:  # Until the hub's reader has handed on the last publication.
                await asyncio.sleep(0.05)
                if queue.qsize() and queue._queue[-1] == last:  # type: ignore[attr-defined]
                    break
            kept = [queue.get_nowait() for _ in range(queue.qsize())]
            await hub.unsubscribe(channel, queue)
            return kept
        finally:
            await hub.aclose()

    kept = asyncio.run(asyncio.wait_for(scenario(), 10))
    newest = range(hub_module.QUEUE_LIMIT * 2, hub_module.QUEUE_LIMIT * 3)
    assert kept == [str(number).encode() for number in newest]


@needs_redis
def test_a_subscription_cancelled_midway_leaves_nothing_behind(monkeypatch):
    """A client that goes away while its stream subscribes cancels the subscription; the hub
    keeps no listener for it, and the next stream of the job subscribes normally."""
    monkeypatch.setattr(hub_module, "SUBSCRIBE_TIMEOUT", 1.0)

    async def scenario():
        hub = EventHub(django_settings.TASK_FERRY["REDIS_URL"])
        channel = "tf-tests:events:cancelled-midway"
        try:
            outcomes = []
            # Cancelled while connecting, then while waiting for Redis to confirm (a stalled
            # reader stands in for a slow Redis).
            for stalled in (False, True):
                if stalled:
                    hub._reader = asyncio.create_task(asyncio.sleep(60))
                    hub._reader_pubsub = hub._pubsub
                subscribing = asyncio.create_task(hub.subscribe(channel))
                await asyncio.sleep(0.2 if stalled else 0)
                subscribing.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await subscribing
                await asyncio.sleep(0.1)  # the handed-off unsubscribe
                outcomes.append(dict(hub._queues))
            hub._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hub._reader
            queue = await hub.subscribe(channel)
            await hub.client.publish(channel, b"after")
            received = await asyncio.wait_for(queue.get(), 2)
            await hub.unsubscribe(channel, queue)
            return outcomes, received, dict(hub._queues)
        finally:
            await hub.aclose()

    outcomes, received, left = asyncio.run(scenario())
    assert outcomes == [{}, {}]
    assert received == b"after"
    assert left == {}


@pytest.mark.django_db(transaction=True, databases=["default", "jobs"])
def test_the_stream_works_in_a_project_with_atomic_requests(user, hold, monkeypatch):
    """``ATOMIC_REQUESTS`` wraps every view in a transaction, which Django refuses for an async
    view: each stream request was a 500 ("You cannot use ATOMIC_REQUESTS with async views.")."""
    from django.db import connections

    for alias in connections:
        monkeypatch.setitem(connections.settings[alias], "ATOMIC_REQUESTS", True)
        monkeypatch.setitem(connections[alias].settings_dict, "ATOMIC_REQUESTS", True)
    job = start(create(user, steps=4), percentage=50)
    client = Client(raise_request_exception=False)
    client.force_login(user)
    response = client.get(url(job))
    assert response.status_code == 200
    assert parse_events(response.content.decode())[1][1]["progress_percentage"] == 50

    async def scenario():
        async_client = AsyncClient(raise_request_exception=False)
        await async_client.aforce_login(user)
        response = await async_client.get(url(job))
        if not response.streaming:  # the polling fallback, with the cache store
            return response.status_code, response.content.decode()
        head = (await anext(response.streaming_content)).decode()
        await response.streaming_content.aclose()
        return response.status_code, head

    status, head = run_async(scenario)
    assert status == 200
    assert parse_events(head)[1][1]["progress_percentage"] == 50


@needs_redis
@pytest.mark.worker
def test_uvicorn_with_a_graceful_shutdown_timeout_stops_while_a_stream_is_open(
    transactional_db, user, hold
):
    """As docs/api.md says: without ``--timeout-graceful-shutdown``, uvicorn's stop (a deploy,
    Ctrl-C, each ``--reload``) waits for every open stream to end, up to ``SSE_MAX_DURATION``."""
    client = Client()
    client.force_login(user)
    cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    job = start(create(user, steps=4), percentage=10)
    received = []
    opened = threading.Event()

    def follow(base):
        http = httpx.Client(base_url=base, cookies={"sessionid": cookie}, timeout=30)
        # Cut short, as EventSource sees it too: it reconnects.
        with (
            http,
            contextlib.suppress(httpx.RemoteProtocolError),
            http.stream("GET", url(job)) as response,
        ):
            for chunk in response.iter_text():
                received.append(chunk)
                opened.set()

    with uvicorn_server(args=("--timeout-graceful-shutdown", "1")) as base:
        reader = threading.Thread(target=follow, args=(base,), daemon=True)
        reader.start()
        assert opened.wait(10)
        stopping = time.monotonic()
    took = time.monotonic() - stopping
    reader.join(5)
    assert took < 5 and not reader.is_alive()
    # The stream closed without `end`: EventSource reconnects, to the next server.
    events = parse_events("".join(received))
    assert [name for name, _ in events] == ["retry", "job"]


def running_snapshot(job_id):
    return {
        **dict.fromkeys(("created_at", "started_at", "finished_at")),
        **{"id": job_id, "type": "scripted", "state": "started", "user_id": 1},
        **{"progress_percentage": 0, "progress_state": "", "error": "", "human_readable_error": ""},
        "updated_at": "2026-01-02T03:04:00Z",
    }


def stream_around(store, job_id, before, after):
    """The ``(percentage, label, state)`` a stream shows when ``before`` is published between
    its subscription and its read of the snapshot, and ``after`` once it has sent it. Each
    change updates a running snapshot, stamped a second later than the one before, as the
    worker's monitor stamps its publications."""
    from task_ferry.api.events import live_events
    from task_ferry.api.hub import get_hub

    snapshot = running_snapshot(job_id)
    stamps = iter(range(1, 60))

    def publish(change):
        snapshot.update(change, updated_at=f"2026-01-02T03:04:{next(stamps):02}Z")
        return sync_to_async(store.write)(job_id, dict(snapshot))

    async def scenario():
        hub = get_hub(django_settings.TASK_FERRY["REDIS_URL"])
        channel = store.events_channel(job_id)
        queue = await hub.subscribe(channel)
        for change in before:
            await publish(change)
        await asyncio.sleep(0.1)  # they reach the stream's queue
        stream = live_events(hub, store, job_id, channel, queue, running_snapshot(job_id))
        chunks = [await anext(stream)]
        for change in after:
            await publish(change)
        chunks.extend([chunk async for chunk in stream])
        return parse_events(b"".join(chunks).decode())

    try:
        events = asyncio.run(scenario())
    finally:
        store.delete([job_id])
    return [
        (data["progress_percentage"], data["progress_state"], data["state"])
        for name, data in events
        if name == "job"
    ]


@needs_redis
def test_publications_older_than_the_streams_first_event_are_not_sent_after_it(store):
    """A stream reads the job's snapshot once subscribed, so publications made in between
    arrive after a first event that already shows them, or a newer one: the stream sent 60 %,
    then 50 %, then 60 % again."""
    shown = stream_around(
        store,
        2**40 + 17,
        before=[
            {"progress_percentage": 50, "progress_state": "a"},
            {"progress_percentage": 60, "progress_state": "a"},
            # A new label at the same percentage: the older one must not come back either.
            {"progress_percentage": 60, "progress_state": "b"},
        ],
        after=[{"progress_percentage": 70}, {"progress_percentage": 100, "state": "finished"}],
    )
    assert shown == [(60, "b", "started"), (70, "b", "started"), (100, "b", "finished")]


@needs_redis
def test_a_stream_sends_a_running_jobs_percentage_going_back(store):
    """A stage created empty counts as complete until ``track()`` gives it a total
    (docs/progress.md), so a running job's percentage can go back: 50 %, then 0 % and up. The
    stream dropped every publication below the highest percentage it had sent, so it stood
    at 50 % with a stale label while polls showed the job's progress."""
    shown = stream_around(
        store,
        2**40 + 18,
        before=[{"progress_percentage": 50, "progress_state": "Counting rows"}],
        after=[
            {"progress_percentage": 0, "progress_state": "Writing rows"},
            {"progress_percentage": 12},
            {"progress_percentage": 100, "state": "finished"},
        ],
    )
    assert shown == [
        (50, "Counting rows", "started"),
        (0, "Writing rows", "started"),
        (12, "Writing rows", "started"),
        (100, "Writing rows", "finished"),
    ]


class HalfOpenProxy:
    """A TCP proxy to Redis whose open connections can go silent without closing: the link a
    failover or a network cut leaves behind (until TCP gives up, minutes later). Connections
    opened afterwards work."""

    def __init__(self, host, port):
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.generation = 0
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_open_connections(self):
        self.generation += 1

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
                self.sockets += [client, upstream]
                for pair in ((client, upstream), (upstream, client)):
                    threading.Thread(
                        target=self._pipe, args=(*pair, self.generation), daemon=True
                    ).start()

    def _pipe(self, source, target, generation):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if generation == self.generation:
                    target.sendall(data)

    def close(self):
        for sock in (self.server, *self.sockets):
            sock.close()


@needs_redis
def test_the_hub_replaces_a_subscriber_connection_that_went_silent(monkeypatch):
    """Once Redis stops confirming subscriptions on the hub's connection, every new stream of
    the process waited ``SUBSCRIBE_TIMEOUT`` and fell back to polling, for as long as the dead
    connection lasted; the streams open on it never heard another change."""
    monkeypatch.setattr(hub_module, "SUBSCRIBE_TIMEOUT", 1.0)
    target = urllib.parse.urlsplit(django_settings.TASK_FERRY["REDIS_URL"])
    proxy = HalfOpenProxy(target.hostname, target.port or 6379)
    direct = redis.Redis.from_url(django_settings.TASK_FERRY["REDIS_URL"])
    prefix = f"{django_settings.TASK_FERRY['KEY_PREFIX']}:events:silent"

    async def scenario():
        hub = EventHub(target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl())
        try:
            following = await hub.subscribe(f"{prefix}-1")
            proxy.cut_open_connections()
            with pytest.raises(redis.ConnectionError):
                await hub.subscribe(f"{prefix}-2")
            # The stream open on the dead connection is told, and its channel subscribed
            # again on a new connection.
            told = [await asyncio.wait_for(following.get(), 2) for _ in range(2)]
            await sync_to_async(direct.publish)(f"{prefix}-1", b"still followed")
            told.append(await asyncio.wait_for(following.get(), 2))
            queue = await hub.subscribe(f"{prefix}-3")
            await sync_to_async(direct.publish)(f"{prefix}-3", b"live again")
            received = await asyncio.wait_for(queue.get(), 2)
            await hub.unsubscribe(f"{prefix}-3", queue)
            await hub.unsubscribe(f"{prefix}-1", following)
            return told, received
        finally:
            await hub.aclose()

    try:
        told, received = asyncio.run(scenario())
    finally:
        proxy.close()
        direct.close()
    assert told == [Link.LOST, Link.RESUBSCRIBED, b"still followed"]
    assert received == b"live again"


@pytest.fixture
def streams_behind_a_proxy(monkeypatch):
    """Event streams whose hub reaches Redis through a ``HalfOpenProxy`` the test can cut, while
    the store writes and publishes to Redis directly, as a job's worker does. Yields the proxy
    and the hubs made (one, once a stream opens): the test closes them in its event loop."""
    target = urllib.parse.urlsplit(django_settings.TASK_FERRY["REDIS_URL"])
    proxy = HalfOpenProxy(target.hostname, target.port or 6379)
    hubs: list[EventHub] = []

    def hub_behind_the_proxy(url):
        if not hubs:
            hubs.append(EventHub(target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()))
        return hubs[0]

    monkeypatch.setattr(events_module, "get_hub", hub_behind_the_proxy)
    try:
        yield proxy, hubs
    finally:
        proxy.close()


@needs_redis
def test_a_stream_whose_subscriber_connection_goes_silent_while_no_stream_opens_gets_the_end(
    transactional_db, user, hold, settings, monkeypatch, streams_behind_a_proxy
):
    """A link left half-open (a failover, a network cut) was noticed only when a new stream
    subscribed: with none opening, the streams open on it heard nothing more, and waited out
    ``SSE_MAX_DURATION``. The hub now PINGs its idle connection and gives it up when no PONG
    comes, as it does on an error."""
    for name in ("PING_INTERVAL", "PONG_TIMEOUT", "SUBSCRIBE_TIMEOUT"):
        monkeypatch.setattr(hub_module, name, 1.0)
    settings.TASK_FERRY = {**settings.TASK_FERRY, "SSE_MAX_DURATION": 20}
    proxy, hubs = streams_behind_a_proxy
    job = start(create(user, steps=2), percentage=50)

    async def scenario():
        try:
            client = AsyncClient()
            await client.aforce_login(user)
            head, reading = await follow(client, job, timeout=25)
            proxy.cut_open_connections()
            finished = await sync_to_async(transition)(
                job, JobState.FINISHED, from_states=[JobState.STARTED], progress_percentage=100
            )
            began = time.monotonic()
            return head, finished, await reading, time.monotonic() - began
        finally:
            for hub in hubs:
                await hub.aclose()

    head, finished, rest, took = run_async(scenario, timeout=30)
    assert finished
    assert parse_events(head)[1][1]["progress_percentage"] == 50
    assert states_shown(rest) == [("job", "finished"), ("end", "finished")]
    # A PING, its PONG's timeout, a pause, a new subscription and a read.
    assert took < 10, took


@needs_redis
def test_a_stream_reads_its_jobs_snapshot_promptly_once_its_hub_recovers_from_a_network_cut(
    transactional_db, user, hold, settings, monkeypatch, streams_behind_a_proxy
):
    """A network cut leaves every connection of the hub's pool silent, not only its subscriber
    connection: once subscribed again, the stream read its job's snapshot over one of them and
    waited out ``SOCKET_TIMEOUT`` before it showed the progress made meanwhile (or, with no
    retry, found nothing and showed the job's row, older). The hub now drops its pool's idle
    connections with its subscriber connection."""
    for name in ("PING_INTERVAL", "PONG_TIMEOUT"):
        monkeypatch.setattr(hub_module, name, 0.5)
    # So that a read left waiting on a silent connection cannot pass for a prompt one.
    monkeypatch.setattr(hub_module, "SOCKET_TIMEOUT", 5.0)
    settings.TASK_FERRY = {**settings.TASK_FERRY, "SSE_MAX_DURATION": 30}
    proxy, hubs = streams_behind_a_proxy
    job = start(create(user, steps=2), percentage=50)

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(url(job))
        chunks = response.streaming_content
        try:
            # Its first event, read over a connection of the hub's pool, which stays there.
            head = (await anext(chunks)).decode()
            proxy.cut_open_connections()
            cut_at = time.monotonic()
            # Published while the hub's subscriber connection is silent: only the snapshot
            # read once subscribed again tells the stream.
            job.progress_percentage = 80
            await sync_to_async(publish)(job)
            while (chunk := (await asyncio.wait_for(anext(chunks), 10)).decode()).startswith(":"):
                pass
            return head, chunk, time.monotonic() - cut_at
        finally:
            await chunks.aclose()
            for hub in hubs:
                await hub.aclose()

    head, chunk, took = run_async(scenario, timeout=30)
    assert parse_events(head)[1][1]["progress_percentage"] == 50
    [(name, data)] = parse_events(chunk)
    assert (name, data["state"], data["progress_percentage"]) == ("job", "started", 80)
    # A PING, its PONG's timeout and a pause before subscribing again (0.25 s at most), then
    # one read (about 1.2 s in all): not a read that waits out SOCKET_TIMEOUT.
    assert took < hub_module.SOCKET_TIMEOUT - 1, took


@needs_redis
@pytest.mark.parametrize("protocol", [2, 3])
def test_the_hub_keeps_an_idle_subscriber_connection_that_answers_its_pings(monkeypatch, protocol):
    """Its PINGs are answered, in either protocol, and the hub keeps its connection."""
    monkeypatch.setattr(hub_module, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(hub_module, "PONG_TIMEOUT", 0.5)
    target = urllib.parse.urlsplit(django_settings.TASK_FERRY["REDIS_URL"])
    name = f"{django_settings.TASK_FERRY['KEY_PREFIX']}-pinged-{protocol}"
    direct = redis.Redis.from_url(django_settings.TASK_FERRY["REDIS_URL"])
    channel = f"{django_settings.TASK_FERRY['KEY_PREFIX']}:events:pinged"

    async def scenario():
        query = f"protocol={protocol}&client_name={name}"
        hub = EventHub(target._replace(query=query).geturl())
        try:
            queue = await hub.subscribe(channel)
            await asyncio.sleep(2)
            [reader] = [c for c in await sync_to_async(direct.client_list)() if c["name"] == name]
            await sync_to_async(direct.publish)(channel, b"still here")
            received = [await asyncio.wait_for(queue.get(), 2)]
            await hub.unsubscribe(channel, queue)
            return reader["cmd"], received
        finally:
            await hub.aclose()

    try:
        last_command, received = asyncio.run(scenario())
    finally:
        direct.close()
    assert last_command == "ping"
    # No ``Link.LOST`` before it: the connection was kept.
    assert received == [b"still here"]


class StalledProxy(HalfOpenProxy):
    """A TCP proxy to Redis that, while ``stalled``, takes connections and answers nothing on
    them (a Redis frozen by a long command or a full disk, a stalled load balancer)."""

    stalled = True

    def _pipe(self, source, target, generation):
        super()._pipe(source, target, -1 if self.stalled else generation)


class GatedProxy(HalfOpenProxy):
    """A TCP proxy to Redis that holds back, in order, what goes to Redis while ``to_redis``
    is clear, and what comes from it while ``from_redis`` is."""

    def __init__(self, host, port):
        self.to_redis, self.from_redis = threading.Event(), threading.Event()
        self.to_redis.set()
        self.from_redis.set()
        super().__init__(host, port)

    def _pipe(self, source, target, generation):
        # An accepted connection's own end has the proxy's port: what it reads goes to Redis.
        gate = self.to_redis if source.getsockname()[1] == self.port else self.from_redis
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                gate.wait()
                target.sendall(data)


async def until(predicate, what, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@needs_redis
def test_a_subscription_after_an_unsubscribe_is_confirmed_by_its_own_answer_not_an_older_one():
    """A stream that left its channel before Redis confirmed its subscription (its client
    gone), followed at once by another stream of that job, had the hub send SUBSCRIBE,
    UNSUBSCRIBE, SUBSCRIBE: the answer to the first confirmed the third, so the new stream
    read its job's snapshot and counted on publications while Redis had not yet subscribed
    the channel again, and missed what was published meanwhile."""
    target = urllib.parse.urlsplit(django_settings.TASK_FERRY["REDIS_URL"])
    proxy = GatedProxy(target.hostname, target.port or 6379)
    prefix = f"{django_settings.TASK_FERRY['KEY_PREFIX']}:events:again"
    channel = f"{prefix}-followed"

    async def scenario():
        hub = EventHub(target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl())
        direct = redis.asyncio.Redis.from_url(django_settings.TASK_FERRY["REDIS_URL"])
        try:
            # The hub's connection is open and read.
            warm = await hub.subscribe(f"{prefix}-warm")
            proxy.from_redis.clear()
            leaving = asyncio.create_task(hub.subscribe(channel))
            await until(lambda: hub._sent.get(channel) == 1, "the first subscription sent")
            leaving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
            await until(lambda: not hub._pending, "the unsubscribe sent")
            proxy.to_redis.clear()
            coming = asyncio.create_task(hub.subscribe(channel))
            await until(lambda: hub._sent.get(channel) == 2, "the second subscription sent")
            # The answers to the first subscription and to the unsubscribe reach the hub;
            # the second subscription has not reached Redis.
            proxy.from_redis.set()
            await until(lambda: hub._sent.get(channel) == 1, "the first answer read")
            done, _ = await asyncio.wait([coming], timeout=0.2)
            told_subscribed = bool(done)
            receivers = await direct.publish(channel, b"missed if told subscribed")
            proxy.to_redis.set()
            queue = await coming
            await direct.publish(channel, b"once subscribed")
            received = []
            with contextlib.suppress(TimeoutError):
                received.append(await asyncio.wait_for(queue.get(), 2))
            await hub.unsubscribe(channel, queue)
            await hub.unsubscribe(f"{prefix}-warm", warm)
            return told_subscribed, receivers, received
        finally:
            proxy.to_redis.set()
            proxy.from_redis.set()
            await hub.aclose()
            await direct.aclose()

    try:
        told_subscribed, receivers, received = asyncio.run(scenario())
    finally:
        proxy.close()
    # Redis had no subscriber of the channel then: the stream was not told it had one, and
    # got what was published once it was.
    assert (told_subscribed, receivers, received) == (False, 0, [b"once subscribed"])


@needs_redis
def test_streams_subscribing_together_to_a_redis_that_answers_nothing_fail_together():
    """The hub connected while holding its lock, so each stream waited for every one before
    it to time out: four opened together fell back to polling after 2, 4, 6 and 8 seconds,
    and a burst of them kept requests waiting for minutes."""
    target = urllib.parse.urlsplit(django_settings.TASK_FERRY["REDIS_URL"])
    proxy = StalledProxy(target.hostname, target.port or 6379)
    direct = redis.Redis.from_url(django_settings.TASK_FERRY["REDIS_URL"])
    prefix = f"{django_settings.TASK_FERRY['KEY_PREFIX']}:events:stalled"

    async def scenario():
        hub = EventHub(target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl())
        began = time.monotonic()

        async def fails_after(channel):
            with pytest.raises(redis.RedisError):
                await hub.subscribe(channel)
            return time.monotonic() - began

        try:
            took = await asyncio.gather(*(fails_after(f"{prefix}-{i}") for i in range(4)))
            # Redis answers again: the next stream tries again, and subscribes.
            proxy.stalled = False
            queue = await hub.subscribe(f"{prefix}-live")
            await sync_to_async(direct.publish)(f"{prefix}-live", b"live again")
            received = await asyncio.wait_for(queue.get(), 2)
            await hub.unsubscribe(f"{prefix}-live", queue)
            return took, received
        finally:
            await hub.aclose()

    try:
        took, received = asyncio.run(scenario())
    finally:
        proxy.close()
        direct.close()
    # One attempt's timeout (SOCKET_TIMEOUT) for all four, not one after another.
    assert max(took) < hub_module.SOCKET_TIMEOUT + 1.5, took
    assert received == b"live again"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_streams_without_redis_log_the_outage_once_not_once_per_request(
    transactional_db, user, hold, redis_server, caplog
):
    """Every ``EventSource`` reconnects every two seconds to the polling fallback: a warning
    per request flooded the logs while Redis was down."""
    job = start(create(user, steps=2), percentage=50)
    redis_server.stop()

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        modes = []
        for requests, then in ((5, redis_server.start), (1, redis_server.stop), (3, None)):
            for _ in range(requests):
                response = await client.get(url(job))
                modes.append(response["X-Task-Ferry-Stream"])
                if response.streaming:
                    await response.streaming_content.aclose()
            if then is not None:
                await sync_to_async(then)()
        return modes

    with caplog.at_level("WARNING", logger="task_ferry"):
        assert run_async(scenario) == ["poll"] * 5 + ["live"] + ["poll"] * 3
    outages = [r for r in caplog.records if "event stream" in r.getMessage().lower()]
    assert len(outages) == 2, [r.getMessage() for r in outages]


async def follow(client, job, timeout):
    """Open the job's stream, live; its first events, and a task reading the rest."""
    response = await client.get(url(job))
    assert response["X-Task-Ferry-Stream"] == "live"
    head = (await anext(response.streaming_content)).decode()
    return head, asyncio.create_task(read_until_closed(response, timeout=timeout))


def final_snapshot(job):
    return {**job_snapshot(job), "state": "finished", "progress_percentage": 100}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
@pytest.mark.parametrize("opening_meanwhile", [True, False], ids=["stream-opening", "quiet"])
def test_a_stream_outlives_a_redis_stall_and_ends_with_the_final_state(
    transactional_db, user, hold, redis_server, store, monkeypatch, opening_meanwhile
):
    """Redis stopped answering (a slow fork, a network hiccup) past the subscription timeout
    while another stream opened: the hub gave its connection up and every open stream of the
    process ended. (A stall with no stream opening went unnoticed, and did no harm.)"""
    monkeypatch.setattr(hub_module, "SUBSCRIBE_TIMEOUT", 1.0)
    job, another = (start(create(user, steps=2), percentage=50) for _ in range(2))

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        head, reading = await follow(client, job, timeout=20)
        other = None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            if opening_meanwhile:
                # It waits out its subscription, and polls.
                other = (await client.get(url(another)))["X-Task-Ferry-Stream"]
            await asyncio.sleep(hub_module.SOCKET_TIMEOUT + 2 * hub_module.SUBSCRIBE_TIMEOUT)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await sync_to_async(store.write)(job.pk, final_snapshot(job))
        return head, other, await reading

    head, other, rest = run_async(scenario, timeout=30)
    assert parse_events(head)[1][1]["progress_percentage"] == 50
    assert other == ("poll" if opening_meanwhile else None)
    assert states_shown(rest) == [("job", "finished"), ("end", "finished")]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_a_stream_outlives_a_redis_restart_and_ends_with_the_final_state(
    transactional_db, user, hold, redis_server, store
):
    """Redis restarted (a crash, an upgrade): every open stream of the process ended. Now the
    hub subscribes again, and each stream reads the snapshot the job reached meanwhile."""
    job = start(create(user, steps=2), percentage=50)

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        head, reading = await follow(client, job, timeout=20)
        await sync_to_async(redis_server.stop)()
        await asyncio.sleep(1)
        await sync_to_async(redis_server.start)()
        # Most likely before the hub has subscribed again: then only its snapshot tells.
        await sync_to_async(store.write)(job.pk, final_snapshot(job))
        return head, await reading

    head, rest = run_async(scenario, timeout=30)
    assert parse_events(head)[1][1]["progress_percentage"] == 50
    assert states_shown(rest) == [("job", "finished"), ("end", "finished")]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_a_subscription_cancelled_as_it_gives_up_leaves_no_listener_behind(
    redis_server, monkeypatch
):
    """A stream whose subscription Redis did not confirm in time unsubscribed under the hub's
    lock: cancelled while it waited for it (its client gone, the lock held by a connection
    attempt), it left its listener in the hub, and the channel subscribed for good."""
    monkeypatch.setattr(hub_module, "SUBSCRIBE_TIMEOUT", 0.5)
    direct = redis.Redis.from_url(redis_server.url)

    async def scenario():
        hub = EventHub(redis_server.url)
        try:
            following = await hub.subscribe("followed")
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                subscribing = asyncio.create_task(hub.subscribe("given-up"))
                await asyncio.sleep(0.1)
                # A connection attempt elsewhere holds the lock as the subscription times out.
                async with hub._lock:
                    await asyncio.sleep(hub_module.SUBSCRIBE_TIMEOUT + 0.2)
                    subscribing.cancel()
                with contextlib.suppress(asyncio.CancelledError, redis.RedisError):
                    await subscribing
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            # The next stream of that job subscribes, gets a publication, and leaves.
            queue = await hub.subscribe("given-up")
            await hub.client.publish("given-up", b"after")
            received = [await asyncio.wait_for(queue.get(), 5)]
            while received[-1] != b"after":
                received.append(await asyncio.wait_for(queue.get(), 5))
            await hub.unsubscribe("given-up", queue)
            # Redis counts the hub's connection among the channel's subscribers while any
            # listener of the hub is left.
            subscribers = await sync_to_async(numsub_once_settled)(direct, "given-up")
            await hub.unsubscribe("followed", following)
            return received[-1], subscribers
        finally:
            await hub.aclose()

    try:
        received, subscribers = asyncio.run(scenario())
    finally:
        direct.close()
    assert received == b"after"
    assert subscribers == 0


def numsub_once_settled(client, channel, timeout=3.0):
    """The channel's subscriber count once it is 0, or as it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (count := dict(client.pubsub_numsub(channel))[channel.encode()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return count


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
@pytest.mark.parametrize("outage", ["restart", "stall"])
def test_a_job_that_ended_while_redis_was_out_ends_its_stream_once_redis_is_back(
    transactional_db, user, hold, redis_server, settings, monkeypatch, outage
):
    """Its final snapshot never reached the store: refused while Redis was down (which came
    back empty), or timed out while it stalled (which kept the job's older snapshot). The
    stream, subscribed again, found no snapshot or the older one, and waited out
    ``SSE_MAX_DURATION``. It now reads the job's row, which has the final state."""
    monkeypatch.setattr(hub_module, "SUBSCRIBE_TIMEOUT", 1.0)
    settings.TASK_FERRY = {**settings.TASK_FERRY, "SSE_MAX_DURATION": 20}
    job, another = (start(create(user, steps=2), percentage=50) for _ in range(2))

    async def scenario():
        client = AsyncClient()
        await client.aforce_login(user)
        head, reading = await follow(client, job, timeout=30)
        if outage == "restart":
            await sync_to_async(redis_server.stop)()
        else:
            redis_server.proc.send_signal(signal.SIGSTOP)
            # A stream opening meanwhile waits out its subscription: the hub gives its
            # connection up.
            assert (await client.get(url(another)))["X-Task-Ferry-Stream"] == "poll"
        try:
            # The worker's end: the row is written, its publication never reaches Redis.
            finished = await sync_to_async(transition)(
                job, JobState.FINISHED, from_states=[JobState.STARTED], progress_percentage=100
            )
        finally:
            if outage == "restart":
                await sync_to_async(redis_server.start)()
            else:
                redis_server.proc.send_signal(signal.SIGCONT)
        began = time.monotonic()
        return head, finished, await reading, time.monotonic() - began

    head, finished, rest, took = run_async(scenario, timeout=40)
    assert finished
    assert parse_events(head)[1][1]["progress_percentage"] == 50
    assert states_shown(rest) == [("job", "finished"), ("end", "finished")]
    assert without_comments(rest)[0][1]["progress_percentage"] == 100
    assert took < 15
