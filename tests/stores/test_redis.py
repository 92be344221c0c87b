"""The Redis progress store, against a redis-server of the test's own (its statistics and
configuration are the test's alone)."""

import json
import re
import shutil
import socket
import time

import pytest
import redis

from task_ferry.exceptions import ProgressStoreUnavailable
from task_ferry.stores.base import get_store
from task_ferry.stores.redis import DELETE_BATCH_SIZE, RedisProgressStore, redacted_url

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server on PATH"
)


def key_counts_of_dels(client):
    """How many keys each DEL since the slow log's reset named. The slow log keeps a command's
    first arguments and then "... (N more arguments)"."""
    counts = []
    for entry in client.slowlog_get(-1):
        command = entry["command"]
        if not command.startswith(b"DEL "):
            continue
        shown, more = command, 0
        if match := re.search(rb" \.\.\. \((\d+) more arguments\)$", command):
            shown, more = command[: match.start()], int(match[1])
        counts.append(len(shown.split()) - 1 + more)
    return counts


def test_deleting_many_jobs_forgets_and_announces_each_in_commands_of_bounded_size(
    redis_server,
):
    """All the keys of a delete went in one ``DEL``: for 100,000 jobs, one command of 200,000
    keys, during which Redis served no one else (workers' progress, polls, cancel requests)."""
    store = get_store()
    client = redis.Redis.from_url(redis_server.url)
    job_ids = list(range(1, 2 * DELETE_BATCH_SIZE + 8))
    store.write_many({i: {"id": i, "state": "started"} for i in job_ids})
    for job_id in job_ids[::50]:
        store.request_cancel(job_id, "token")
    # A listener of every job's stream, as the event streams of a process are.
    streams = client.pubsub()
    streams.psubscribe(store.events_channel(0).removesuffix("0") + "*")
    assert streams.get_message(timeout=5)["type"] == "psubscribe"
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 10 * len(job_ids))
    client.slowlog_reset()

    store.delete(job_ids)

    assert list(client.scan_iter(f"{store.key_prefix}:*")) == []
    notices = []
    deadline = time.monotonic() + 10
    while len(notices) < len(job_ids) and time.monotonic() < deadline:
        message = streams.get_message(timeout=1)
        if message is not None and message["type"] == "pmessage":
            notices.append(json.loads(message["data"]))
    assert sorted(n["id"] for n in notices) == job_ids
    assert all(n["deleted"] is True for n in notices)
    counts = key_counts_of_dels(client)
    assert sum(counts) == 2 * len(job_ids)
    assert len(counts) == 3 and max(counts) == 2 * DELETE_BATCH_SIZE
    streams.close()
    client.close()


def test_deleting_no_job_sends_nothing(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    get_store().delete([])
    assert key_counts_of_dels(client) == []
    client.close()


def test_a_delete_cut_short_by_redis_going_away_counts_the_jobs_it_did_not_forget(
    redis_server,
    monkeypatch,
    caplog,
):
    """Redis went away after the first of three batches: the store stopped there, and the
    warning said none of the jobs were forgotten, though the first batch's were."""
    from redis.client import Pipeline

    from task_ferry.exceptions import SnapshotsNotForgotten
    from task_ferry.handler import forget_snapshots

    store = get_store()
    job_ids = list(range(1, 2 * DELETE_BATCH_SIZE + 8))
    store.write_many({i: {"id": i, "state": "started"} for i in job_ids})
    execute = Pipeline.execute
    executed = []

    def execute_then_stop_redis(self, *args, **kwargs):
        result = execute(self, *args, **kwargs)
        executed.append(result)
        if len(executed) == 1:
            redis_server.stop()
        return result

    monkeypatch.setattr(Pipeline, "execute", execute_then_stop_redis)
    with pytest.raises(SnapshotsNotForgotten) as raised:
        store.delete(job_ids)
    assert raised.value.job_ids == job_ids[DELETE_BATCH_SIZE:]

    redis_server.start()
    store.write_many({i: {"id": i, "state": "started"} for i in job_ids})
    executed.clear()
    with caplog.at_level("WARNING", logger="task_ferry"):
        forget_snapshots(job_ids)
    (warning,) = [r.getMessage() for r in caplog.records if "not forgotten" in r.getMessage()]
    not_forgotten = len(job_ids) - DELETE_BATCH_SIZE
    assert f"snapshots of {not_forgotten} of {len(job_ids)} deleted jobs not forgotten" in warning


def published_to(pubsub, timeout):
    """The data of the messages ``pubsub`` receives within ``timeout`` seconds."""
    received, deadline = [], time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == "message":
            received.append(message["data"])
    return received


def test_projects_on_two_databases_of_one_redis_hear_only_their_own_jobs(
    redis_server,
):
    """Redis has one set of channels for all its databases: two projects told apart by the
    database number alone (the same default KEY_PREFIX) cancelled each other's jobs of the same
    id, and an event stream got the other project's snapshots."""
    server = redis_server.url.rsplit("/", 1)[0]
    ours = RedisProgressStore(timeout=60, key_prefix="task_ferry", url=f"{server}/1")
    theirs = RedisProgressStore(timeout=60, key_prefix="task_ferry", url=f"{server}/2")
    listener = ours.cancel_listener()
    events = ours.client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(ours.events_channel(16))
    try:
        theirs.request_cancel(16)
        theirs.write(16, {"id": 16, "state": "started"})
        assert listener.wait(0.5) == []
        assert published_to(events, 0.2) == []

        ours.request_cancel(16)
        ours.write(16, {"id": 16, "state": "started"})
        assert listener.wait(2) == [16]
        [snapshot] = published_to(events, 0.5)
        assert json.loads(snapshot) == {"id": 16, "state": "started"}
    finally:
        listener.close()
        events.close()


def test_errors_name_the_redis_without_its_password():
    """The URL goes into ProgressStoreUnavailable, which the admin shows its users and the
    commands print; its password must not."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = RedisProgressStore(
        timeout=60, key_prefix="tf", url=f"redis://deploy:s3cret@127.0.0.1:{port}/0"
    )
    with pytest.raises(ProgressStoreUnavailable) as caught:
        store.read(1)
    assert "s3cret" not in str(caught.value)
    assert f"Redis at redis://deploy:***@127.0.0.1:{port}/0:" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://deploy:s3c:ret@redis.example:6380", "rediss://deploy:***@redis.example:6380"),
        ("redis://deploy@127.0.0.1/0", "redis://deploy@127.0.0.1/0"),
        (
            "unix:///run/redis.sock?db=2&password=s3cret",
            "unix:///run/redis.sock?db=2&password=***",
        ),
        # redis-py reads the user name up to the first ":" before the last "@": the password
        # of a user name with an "@", and one whose parameter name is percent-encoded, showed.
        ("redis://app@prod:s3cret@127.0.0.1/0", "redis://app@prod:***@127.0.0.1/0"),
        ("redis://deploy:s3c@ret@127.0.0.1/0", "redis://deploy:***@127.0.0.1/0"),
        ("redis://127.0.0.1/0?pass%77ord=s3cret", "redis://127.0.0.1/0?pass%77ord=***"),
        ("unix://:s3cret@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("redis://app@prod@127.0.0.1:6379/0", "redis://app@prod@127.0.0.1:6379/0"),
    ],
)
def test_redacted_url(url, shown):
    assert redacted_url(url) == shown
    # Each password the test hides is one redis-py would send.
    if "s3cret" in url or "s3c@ret" in url:
        password = redis.connection.parse_url(url)["password"]
        assert password in url and password not in shown
