"""The fast path end to end: a job runs in a thread of the test process (immediate executor),
inside its own open transaction, while the test looks at the store and the API."""

import itertools
import logging
import threading
import time

import pytest
from django.core.checks import run_checks
from django.db import connection

from task_ferry import signals
from task_ferry.exceptions import JobCancelled
from task_ferry.handler import JobHandler, transition
from task_ferry.models import Heartbeat, Job, JobState
from task_ferry.monitor import get_monitor
from task_ferry.registry import job_type_registry
from task_ferry.snapshot import STATE_LABEL_MAX_LENGTH, cancel_token, truncate_state
from task_ferry.stores.base import get_store
from tests.gated import WAIT, GatedJobType, needs_concurrent_writers, start_halfway, wait_until
from tests.testapp.models import HookCall, Marker, ScriptedJob


@needs_concurrent_writers
def test_progress_is_visible_in_the_store_and_api_while_the_transaction_is_open(
    transactional_db, user, api, gated
):
    thread, job = start_halfway(gated, user, steps=20)
    wait_until(
        lambda: (get_store().read(job.pk) or {}).get("progress_percentage") == 50,
        "the store shows 50%",
    )
    body = api.get(f"/api/jobs/{job.pk}/").json()
    assert (body["state"], body["progress_percentage"], body["progress_state"]) == (
        "started",
        50,
        "step 10",
    )
    # The job's transaction really is open: its row is not visible from here yet.
    assert not Marker.objects.exists()
    assert Job.objects.get(pk=job.pk).progress_percentage == 0
    gated.release.set()
    thread.finish()
    body = api.get(f"/api/jobs/{job.pk}/").json()
    assert (body["state"], body["progress_percentage"], body["progress_state"]) == (
        "finished",
        100,
        "step 20",
    )
    assert Marker.objects.filter(name=f"gated {job.pk}").exists()


@needs_concurrent_writers
def test_cancel_stops_the_job_at_its_next_tick_and_rolls_its_work_back(
    transactional_db, user, gated
):
    thread, job = start_halfway(gated, user, steps=20)
    JobHandler.cancel(user, job.pk)
    # The very next tick raises: the job never reaches its second half.
    assert gated.progress.cancel_requested
    gated.release.set()
    thread.finish()
    row = ScriptedJob.objects.get(pk=job.pk)
    # How far it got stays; its label would read as work still going on.
    assert (row.state, row.progress_percentage, row.progress_state, row.result) == (
        "cancelled",
        50,
        "",
        "",
    )
    assert not Marker.objects.exists()
    assert list(HookCall.objects.values_list("job_id", "hook")) == [(job.pk, "on_cancelled")]
    snapshot = get_store().read(job.pk)
    assert (snapshot["state"], snapshot["progress_percentage"]) == ("cancelled", 50)


@needs_concurrent_writers
@pytest.mark.parametrize(
    "store_path",
    ["task_ferry.stores.redis.RedisProgressStore", "task_ferry.stores.cache.CacheProgressStore"],
)
def test_a_cancel_request_from_another_process_reaches_the_job_through_the_store(
    transactional_db, user, gated, settings, store_path
):
    # Redis pushes the request to the monitor; the cache store is polled once per interval.
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "PROGRESS_STORE": store_path,
        "REDIS_URL": settings.REDIS_URL,
    }
    thread, job = start_halfway(gated, user, steps=20)
    # What cancel() in another process does: only the store hears of it.
    get_store().request_cancel(job.pk, token=cancel_token(job))
    wait_until(lambda: gated.progress.cancel_requested, "the monitor passed the request on")
    gated.release.set()
    thread.finish()
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"
    assert HookCall.objects.filter(job_id=job.pk, hook="on_cancelled").count() == 1


@needs_concurrent_writers
def test_switching_to_a_store_without_push_polls_it_for_cancel_requests(
    transactional_db, user, other_user, gated, settings
):
    from task_ferry.monitor import get_monitor

    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "PROGRESS_STORE": "task_ferry.stores.redis.RedisProgressStore",
        "REDIS_URL": settings.REDIS_URL,
    }
    first, _ = start_halfway(gated, user, steps=2)
    gated.release.set()
    first.finish()
    # The monitor keeps its Redis subscription a while after the job; the store changes now.
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "PROGRESS_STORE": "task_ferry.stores.cache.CacheProgressStore",
    }
    gated.halfway.clear()
    gated.release.clear()
    thread, job = start_halfway(gated, other_user, steps=20)
    watch = get_monitor()._watches[job.pk]
    wait_until(lambda: watch.cancel_checked, "the monitor read the job's early cancel requests")
    get_store().request_cancel(job.pk, token=cancel_token(job))
    wait_until(lambda: gated.progress.cancel_requested, "the monitor polled the cache store")
    gated.release.set()
    thread.finish()
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"


@needs_concurrent_writers
def test_cancel_returns_while_the_job_holds_its_row_lock(transactional_db, user, gated):
    thread, job = start_halfway(gated, user, steps=20, lock_own_row=True)
    returned = threading.Event()

    def cancel():
        try:
            JobHandler.cancel(user, job.pk)
            returned.set()
        finally:
            connection.close()

    canceller = threading.Thread(target=cancel, daemon=True)
    canceller.start()
    # The job is parked holding the lock, so cancel() cannot have waited for it.
    assert returned.wait(WAIT)
    assert thread.is_alive()
    gated.release.set()
    thread.finish()
    canceller.join(WAIT)
    row = ScriptedJob.objects.get(pk=job.pk)
    assert (row.state, row.result) == ("cancelled", "")
    assert HookCall.objects.filter(job_id=job.pk, hook="on_cancelled").count() == 1


@needs_concurrent_writers
def test_a_job_whose_progress_stays_put_keeps_its_snapshot_past_the_store_timeout(
    transactional_db, user, api, gated, settings
):
    # Snapshots expire after PROGRESS_CACHE_TIMEOUT; a job parked at 50 % for longer than that
    # is published again before its snapshot goes, instead of showing the row's 0 %.
    settings.TASK_FERRY = {**settings.TASK_FERRY, "PROGRESS_CACHE_TIMEOUT": 1}
    thread, job = start_halfway(gated, user, steps=20)
    wait_until(lambda: (get_store().read(job.pk) or {}).get("progress_percentage") == 50, "50%")
    for _ in range(6):
        time.sleep(0.4)
        assert api.get(f"/api/jobs/{job.pk}/").json()["progress_percentage"] == 50
    gated.release.set()
    thread.finish()


@needs_concurrent_writers
@pytest.mark.parametrize(("interval", "kept"), [(1.4, True), (2.4, False)])
def test_a_snapshot_expires_between_publications_exactly_where_w005_says_so(
    transactional_db, user, gated, settings, interval, kept
):
    """An interval over half of PROGRESS_CACHE_TIMEOUT has the monitor publish an unchanged
    snapshot again at every interval, past half its lifetime: it is kept. One of the whole
    timeout or more lets it expire before the next publication."""
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        # Seconds long enough that a busy machine's delays of the monitor thread (a few tenths)
        # keep a republication within the snapshot's lifetime, and an expiry in sight.
        "PROGRESS_CACHE_TIMEOUT": 2,
        "PUBLISH_INTERVAL": interval,
    }
    thread, job = start_halfway(gated, user, steps=20)
    wait_until(lambda: (get_store().read(job.pk) or {}).get("progress_percentage") == 50, "50%")
    missing = False
    deadline = time.monotonic() + 6
    while not missing and time.monotonic() < deadline:
        missing = get_store().read(job.pk) is None
        time.sleep(0.02)
    gated.release.set()
    thread.finish()
    assert missing is not kept
    warned = "task_ferry.W005" in [message.id for message in run_checks(databases=[])]
    assert warned is not kept


@needs_concurrent_writers
def test_a_job_holding_its_row_lock_delays_neither_heartbeats_nor_cancel_requests(
    transactional_db, user, gated, settings
):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_INTERVAL": 0.1}
    thread, job = start_halfway(gated, user, steps=20, lock_own_row=True)
    # The first beat inserts the job's heartbeat row while the job's transaction locks its row.
    wait_until(lambda: Heartbeat.objects.filter(job_id=job.pk).exists(), "a heartbeat")
    get_store().request_cancel(job.pk, token=cancel_token(job))
    wait_until(lambda: gated.progress.cancel_requested, "the cancel request reached the job")
    assert thread.is_alive()
    gated.release.set()
    thread.finish()
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"


def test_a_label_longer_than_the_column_is_truncated(db, user, monkeypatch):
    label = "x" * (STATE_LABEL_MAX_LENGTH + 100)

    def run(self, job, progress):
        progress.increment(50, state=label)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    row = Job.objects.get(pk=job.pk)
    assert row.state == "finished"
    assert len(row.progress_state) == STATE_LABEL_MAX_LENGTH
    assert row.progress_state == "x" * (STATE_LABEL_MAX_LENGTH - 1) + "…"
    assert get_store().read(job.pk)["progress_state"] == row.progress_state


def test_a_huge_label_costs_the_monitor_no_more_than_a_short_one():
    """The monitor works out every running job's label at each ``PUBLISH_INTERVAL``: it
    scanned the whole label for characters no database stores before cutting it, 30 ms of
    every 50 for a 10-million-character label that is not ASCII."""
    huge = "é" * 10_000_000 + "\x00"
    began = time.perf_counter()
    for _ in range(10):
        cut = truncate_state(huge)
    assert (time.perf_counter() - began) / 10 < 0.002
    assert cut == "é" * (STATE_LABEL_MAX_LENGTH - 1) + "…"
    assert truncate_state("é\x00\ud800") == "é\ufffd\ufffd"


def test_the_final_state_and_100_percent_are_published_as_the_run_ends(
    db, user, settings, monkeypatch
):
    # With a publish interval far longer than the run, only the run's own end can publish.
    settings.TASK_FERRY = {**settings.TASK_FERRY, "PUBLISH_INTERVAL": 60}
    job = JobHandler.create_and_start(user, "scripted", steps=7)
    snapshot = get_store().read(job.pk)
    assert (snapshot["state"], snapshot["progress_percentage"], snapshot["progress_state"]) == (
        "finished",
        100,
        "step 7 of 7",
    )


@needs_concurrent_writers
def test_publishing_is_throttled_and_the_newest_value_wins(
    transactional_db, user, settings, gated, monkeypatch
):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "PUBLISH_INTERVAL": 0.2}
    store = get_store()
    writes = []
    original = type(store).write_many

    def write_many(self, snapshots):
        # Progress publications only: the run's own start and end snapshots are not throttled.
        writes.extend(
            (time.monotonic(), s["progress_state"])
            for s in snapshots.values()
            if s["state"] == "started" and s["progress_state"]
        )
        original(self, snapshots)

    monkeypatch.setattr(type(store), "write_many", write_many)
    thread, _job = start_halfway(gated, user, steps=2000)
    wait_until(lambda: writes and writes[-1][1] == "step 1000", "the halfway label is published")
    # 1000 ticks in well under one interval, yet one or two publications, the newest label last.
    assert len(writes) <= 2
    published = len(writes)
    time.sleep(0.5)
    assert len(writes) == published  # nothing changed, nothing written
    gated.release.set()
    thread.finish()
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(writes)]
    assert all(gap >= 0.19 for gap in gaps), gaps


@needs_concurrent_writers
def test_a_started_job_shows_started_before_its_first_tick(transactional_db, user, gated):
    # The monitor publishes the start like a progress change, within PUBLISH_INTERVAL.
    thread, job = start_halfway(gated, user, steps=0)
    wait_until(
        lambda: (get_store().read(job.pk) or {}).get("state") == "started",
        "the store shows the job started",
    )
    assert get_store().read(job.pk)["started_at"] is not None
    gated.release.set()
    thread.finish()
    assert get_store().read(job.pk)["state"] == "finished"


@pytest.mark.skipif(not get_store().supports_push, reason="only push stores announce snapshots")
def test_creating_a_job_writes_nothing_to_the_store_and_its_end_is_announced(
    db, user, monkeypatch, django_capture_on_commit_callbacks
):
    from task_ferry.executors.immediate import ImmediateExecutor

    store = get_store()
    listener = store.client.pubsub()
    listener.psubscribe(store.events_channel(0).removesuffix("0") + "*")
    assert listener.get_message(timeout=WAIT)["type"] == "psubscribe"

    def published_for(job_id, timeout):
        """What is published on the job's channel within ``timeout`` (a monitor thread left by
        an earlier test may still publish its own jobs on the others)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = listener.get_message(timeout=left)
            if message is not None and message["channel"] == store.events_channel(job_id).encode():
                return message["data"]
        return None

    try:
        monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
        with django_capture_on_commit_callbacks(execute=True):
            job = JobHandler.create_and_start(user, "scripted")
        # A pending job's row is all there is to know; its first poll stores a snapshot.
        assert store.read(job.pk) is None
        assert published_for(job.pk, 0.3) is None
        JobHandler.run_job(job.pk)
        # The monitor publishes a run that lasts longer than PUBLISH_INTERVAL (0.05 s) while it
        # goes, as on a busy machine, or after an earlier test's store outage: then the end
        # is the second announcement.
        announced = published_for(job.pk, WAIT)
        if announced is not None and b'"state":"started"' in announced:
            announced = published_for(job.pk, WAIT)
        assert announced is not None
        assert b'"state":"finished"' in announced
        assert store.read(job.pk)["state"] == "finished"
    finally:
        listener.close()


def test_a_job_run_inside_the_creating_transaction_leaves_its_final_snapshot(
    db, user, django_capture_on_commit_callbacks
):
    # The ImmediateExecutor runs the job before the creating transaction commits.
    with django_capture_on_commit_callbacks(execute=True):
        job = JobHandler.create_and_start(user, "export_table", table_id=1)
    snapshot = get_store().read(job.pk)
    assert snapshot["state"] == "finished"
    assert snapshot["fields"]["output_path"] == "/exports/result.csv"


@needs_concurrent_writers
def test_the_monitor_closes_the_database_connection_of_its_thread_when_it_goes_idle(
    transactional_db, user, gated, monkeypatch
):
    from django.db import connections
    from rest_framework import serializers

    from task_ferry import monitor

    monkeypatch.setattr(monitor, "IDLE_CLOSE_AFTER", 0.2)
    used = {}

    class QueryingSerializer(serializers.Serializer):
        """A type serializer that queries, as one showing a related row's name would."""

        markers = serializers.SerializerMethodField()

        def get_markers(self, job):
            used[threading.current_thread().name] = connections["default"]
            return Marker.objects.count()

    monkeypatch.setattr(gated, "serializer_class", QueryingSerializer)
    thread, job = start_halfway(gated, user, steps=4)
    # The monitor publishes the start with the type's fields: the serializer ran in its thread.
    wait_until(lambda: (get_store().read(job.pk) or {}).get("state") == "started", "the start")
    monitor_connection = used["task-ferry-monitor"]
    assert monitor_connection.connection is not None
    gated.release.set()
    thread.finish()
    wait_until(lambda: monitor_connection.connection is None, "the monitor's connection closed")


def beat_from_the_monitor_thread(watches):
    """A beat as the monitor thread runs it, on its own thread and database connection."""
    beater = threading.Thread(target=get_monitor()._beat, args=(watches,))
    beater.start()
    beater.join()


def test_a_job_whose_run_ended_before_the_beats_query_is_not_reported_or_cancelled(
    transactional_db, user, monkeypatch, caplog
):
    taken = []

    def run(self, job, progress):
        # The monitor takes its list of watched jobs, then the run ends before the beat's query.
        taken.extend(get_monitor()._watching())

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    assert [watch.job.pk for watch in taken] == [job.pk]
    beat_from_the_monitor_thread(taken)
    assert "ended elsewhere" not in caplog.text
    assert not taken[0].progress.cancel_requested
    assert not Heartbeat.objects.filter(job_id=job.pk).exists()
    assert ScriptedJob.objects.get(pk=job.pk).state == "finished"


@needs_concurrent_writers
def test_a_running_job_ended_elsewhere_is_reported_and_stopped_at_the_next_beat(
    transactional_db, user, gated, caplog
):
    thread, job = start_halfway(gated, user, steps=4)
    transition(Job(pk=job.pk), JobState.FAILED, from_states=[JobState.STARTED], error="lost")
    beat_from_the_monitor_thread(get_monitor()._watching())
    assert f"Jobs [{job.pk}] were ended elsewhere; stopping them here." in caplog.text
    assert gated.progress.cancel_requested
    gated.release.set()
    thread.finish()
    assert Job.objects.get(pk=job.pk).state == "failed"


class UnsavingGatedJobType(GatedJobType):
    """A gated job that never writes its own row."""

    def run(self, job, progress):
        job.save = None  # its run must not touch its row
        Marker.objects.create(name=f"gated {job.pk}")
        progress.increment(50, state="half")
        self.progress = progress
        self.halfway.set()
        assert self.release.wait(WAIT)
        progress.increment(50)


@needs_concurrent_writers
@pytest.mark.parametrize("saves_its_row", [False, True])
def test_a_job_deleted_while_it_runs_leaves_no_snapshot_and_no_error_of_ours(
    transactional_db, user, api, saves_its_row
):
    """Its owner's account deleted (``Job.user`` cascades), say. The run's end raised
    ``DoesNotExist`` into the worker, or stored the job's snapshot as ``started`` again, which
    polls and streams then showed for ``PROGRESS_CACHE_TIMEOUT``."""
    gated = job_type_registry.register(GatedJobType() if saves_its_row else UnsavingGatedJobType())
    try:
        thread, job = start_halfway(gated, user, steps=20)
        wait_until(lambda: get_store().read(job.pk) is not None, "the job is published")
        Job.objects.filter(pk=job.pk).delete()
        # What a beat that read the row just before the delete writes just after it.
        Heartbeat.objects.update_or_create(
            job_id=job.pk, defaults={"worker": "a beat that read the row before it"}
        )
        gated.release.set()
        thread.join(WAIT)
    finally:
        gated.release.set()
        job_type_registry.unregister(gated)
    # Only the job's own error: saving a row that is gone.
    assert thread.error is None or "did not affect any rows" in str(thread.error)
    assert (thread.error is not None) == saves_its_row
    assert get_store().read(job.pk) is None
    assert api.get(f"/api/jobs/{job.pk}/").status_code == 404
    assert api.get(f"/api/jobs/{job.pk}/events/").status_code == 404
    assert not Marker.objects.filter(name=f"gated {job.pk}").exists()
    assert not Heartbeat.objects.filter(job_id=job.pk).exists()


@needs_concurrent_writers
def test_a_running_job_whose_row_is_deleted_is_no_longer_published_after_the_next_beat(
    transactional_db, user, gated, settings
):
    """The delete took its snapshot out of the store, then the monitor published the job as
    ``started`` again at each change until its run ended: polls and streams showed a job that
    was gone, for as long as it ran."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_INTERVAL": 0.2}
    store = get_store()
    thread, job = start_halfway(gated, user, steps=20)
    wait_until(lambda: store.read(job.pk) is not None, "the job is published")
    Job.objects.filter(pk=job.pk).delete()
    deleted_at = time.monotonic()
    # What a beat that read the row just before the delete writes just after it.
    # (Or the monitor's own beat did it already: this very race.)
    Heartbeat.objects.update_or_create(
        job_id=job.pk, defaults={"worker": "a beat that read the row before the delete"}
    )
    # The run goes on making progress, which the monitor would publish, until the monitor
    # stops it at the next beat.
    ticking = threading.Event()
    ticking.set()

    def keep_ticking():
        for i in itertools.count():
            if not ticking.is_set():
                return
            try:
                gated.progress.set_state(f"still going {i}")
            except JobCancelled:
                return
            time.sleep(0.02)

    ticker = threading.Thread(target=keep_ticking, daemon=True)
    ticker.start()
    last_shown = [deleted_at]

    def gone_for_a_second():
        if store.read(job.pk) is not None:
            last_shown[0] = time.monotonic()
        return time.monotonic() - last_shown[0] > 1.0

    try:
        wait_until(gone_for_a_second, "the snapshot to stay out of the store")
    finally:
        ticking.clear()
        ticker.join(WAIT)
        gated.release.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert store.read(job.pk) is None
    # Nor a heartbeat row for a job that has none.
    assert not Heartbeat.objects.filter(job_id=job.pk).exists()


class EndlessGatedJobType(GatedJobType):
    """A gated job that ticks until the test releases it, and records its ending hooks."""

    def __init__(self):
        super().__init__()
        self.hooks = []

    def run(self, job, progress):
        Marker.objects.create(name=f"gated {job.pk}")
        self.progress = progress
        self.halfway.set()
        while not self.release.is_set():
            progress.increment(0, state="exporting")
            time.sleep(0.01)

    def on_error(self, job, exc):
        self.hooks.append(("on_error", job.pk))

    def on_cancelled(self, job):
        self.hooks.append(("on_cancelled", job.pk))


@pytest.fixture
def endless():
    job_type = job_type_registry.register(EndlessGatedJobType())
    yield job_type
    job_type.release.set()
    job_type_registry.unregister(job_type)


@pytest.fixture
def cancelled_signals():
    sent = []

    def receiver(sender, job, **kwargs):
        sent.append(job.pk)

    signals.job_cancelled.connect(receiver, weak=False)
    yield sent
    signals.job_cancelled.disconnect(receiver)


@needs_concurrent_writers
def test_a_running_job_whose_row_is_deleted_stops_at_its_first_tick_after_the_next_beat(
    transactional_db, user, api, endless, cancelled_signals, settings, caplog
):
    """Its owner's account deleted, say. The run went on to its end, which found no row and
    rolled its work back: an hour's export kept a worker busy for an hour for nothing."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_INTERVAL": 0.2}
    caplog.set_level(logging.INFO, logger="task_ferry")
    thread, job = start_halfway(endless, user)
    wait_until(lambda: Heartbeat.objects.filter(job_id=job.pk).exists(), "a heartbeat")
    Job.objects.filter(pk=job.pk).delete()
    deleted_at = time.monotonic()
    thread.join(WAIT)
    stopped_after = time.monotonic() - deleted_at
    endless.release.set()
    thread.finish()
    # The next beat within 0.2 s, then the next tick within 0.01 s (a loaded machine aside).
    assert stopped_after < WAIT / 2, f"the run went on for {stopped_after:.1f} s after the delete"
    assert endless.progress.cancel_raised
    # Its type may clean up what it left outside the database (a half-written file); nothing
    # else would. No signal: the job's state never changed, it is gone.
    assert endless.hooks == [("on_cancelled", job.pk)]
    assert cancelled_signals == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"Jobs [{job.pk}] were deleted while they ran; stopping them." in caplog.text
    assert not Marker.objects.filter(name=f"gated {job.pk}").exists()
    assert get_store().read(job.pk) is None
    assert api.get(f"/api/jobs/{job.pk}/").status_code == 404
    assert not Heartbeat.objects.filter(job_id=job.pk).exists()
    assert not Job.objects.filter(pk=job.pk).exists()


@needs_concurrent_writers
def test_a_job_swept_then_deleted_while_its_worker_was_frozen_gets_no_second_hook(
    transactional_db, user, endless, settings
):
    """Its ``on_error`` ran when the sweep failed it: ``on_cancelled`` as well would be two
    ending hooks for one job. The run cannot tell from the missing row, only from how long its
    heartbeat had lapsed."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_INTERVAL": 0.2, "HEARTBEAT_TIMEOUT": 1}
    thread, job = start_halfway(endless, user)
    wait_until(lambda: Heartbeat.objects.filter(job_id=job.pk).exists(), "a heartbeat")
    monitor = get_monitor()
    # The worker's monitor frozen (it takes this lock for its list of jobs); the job ticks on.
    with monitor._lock:
        wait_until(lambda: JobHandler.sweep_stale_jobs() == 1, "the sweep to fail the job")
        Job.objects.filter(pk=job.pk).delete()
    thread.join(WAIT)
    endless.release.set()
    thread.finish()
    assert endless.progress.cancel_raised
    assert endless.hooks == [("on_error", job.pk)]
    assert get_store().read(job.pk) is None
    assert not Heartbeat.objects.filter(job_id=job.pk).exists()


class EndingGatedJobType(EndlessGatedJobType):
    """A gated job that, once released, ends without another tick: it returns, or raises."""

    def __init__(self, fails):
        super().__init__()
        self.fails = fails

    def run(self, job, progress):
        Marker.objects.create(name=f"gated {job.pk}")
        self.progress = progress
        self.halfway.set()
        assert self.release.wait(WAIT)
        if self.fails:
            raise ValueError("bad record")


@needs_concurrent_writers
@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_a_job_deleted_while_it_runs_gets_its_ending_hook_without_another_tick(
    transactional_db, user, cancelled_signals, caplog, fails
):
    """Only a tick after the monitor noticed the delete stopped the run and ran
    ``on_cancelled``; a run that returned first (its finish found no row) or raised ended
    with no hook, and the half-written file its type would have removed stayed."""
    caplog.set_level(logging.INFO, logger="task_ferry")
    job_type = job_type_registry.register(EndingGatedJobType(fails))
    try:
        thread, job = start_halfway(job_type, user)
        Job.objects.filter(pk=job.pk).delete()
        job_type.release.set()
        thread.join(WAIT)
    finally:
        job_type.release.set()
        job_type_registry.unregister(job_type)
    assert not thread.is_alive()
    assert job_type.hooks == [("on_error" if fails else "on_cancelled", job.pk)]
    # The run's own error still reaches its caller (the worker's log); nothing else does.
    assert repr(thread.error) == ("ValueError('bad record')" if fails else "None")
    assert cancelled_signals == []
    if not fails:
        assert f"Job {job.pk} was deleted while it ran" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not Marker.objects.filter(name=f"gated {job.pk}").exists()
    assert get_store().read(job.pk) is None
