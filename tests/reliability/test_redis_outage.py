"""A redis-server of the test's own is stopped while a worker runs jobs, then started again."""

from __future__ import annotations

import pytest

from task_ferry.exceptions import ProgressStoreUnavailable
from task_ferry.handler import JobHandler
from task_ferry.models import Heartbeat
from task_ferry.stores.base import get_store
from tests.reliability.helpers import hook_calls, state_of
from tests.testapp.models import HookCall, Marker, ScriptedJob
from tests.waiting import wait_for

pytestmark = pytest.mark.worker


def live_progress(job_id: int) -> int | None:
    try:
        snapshot = get_store().read(job_id)
    except ProgressStoreUnavailable:
        return None
    if snapshot is None or snapshot["state"] != "started":
        return None
    return int(snapshot["progress_percentage"])


def test_jobs_survive_a_redis_outage_and_live_progress_resumes(
    queueing, ferry, processes, redis_server, api, user
):
    ferry(
        REDIS_URL=redis_server.url,
        PUBLISH_INTERVAL=0.02,
        HEARTBEAT_INTERVAL=0.5,
        HEARTBEAT_TIMEOUT=10,
    )
    worker = processes.worker()
    first = JobHandler.create_and_start(user, "scripted", steps=150, tick_delay=0.04)
    wait_for(lambda: (live_progress(first.pk) or 0) > 0)

    redis_server.stop()
    with pytest.raises(ProgressStoreUnavailable):
        get_store().read(first.pk)

    # The API answers from the database.
    detail = api.get(f"/api/jobs/{first.pk}/")
    assert detail.status_code == 200, detail.content
    assert detail.json()["state"] == "started"
    listing = api.get("/api/jobs/")
    assert listing.status_code == 200
    created = api.post("/api/jobs/", {"type": "scripted", "steps": 20, "tick_delay": 0.05})
    assert created.status_code == 201, created.content
    second_id = created.json()["id"]
    assert api.get(f"/api/jobs/{second_id}/").json()["state"] == "pending"
    # A pending job is cancelled through the database.
    doomed = api.post("/api/jobs/", {"type": "scripted"}).json()["id"]
    cancelled = api.post(f"/api/jobs/{doomed}/cancel/")
    assert (cancelled.status_code, cancelled.json()["state"]) == (200, "cancelled")

    redis_server.start()
    # Live progress of the job that ran through the outage shows again, and keeps moving.
    seen = wait_for(lambda: live_progress(first.pk), timeout=10)
    wait_for(lambda: (live_progress(first.pk) or 0) > seen, timeout=10)
    # The job created during the outage publishes live progress once it runs.
    wait_for(lambda: live_progress(second_id), timeout=20)

    wait_for(lambda: state_of(second_id) == "finished", timeout=20)
    for job in ScriptedJob.objects.filter(pk__in=[first.pk, second_id]):
        assert job.state == "finished", job.error
        assert job.progress_percentage == 100
        assert job.result == "done"
        assert job.error == ""
    assert "raised" not in worker.output()
    final = api.get(f"/api/jobs/{first.pk}/").json()
    assert (final["state"], final["progress_percentage"]) == ("finished", 100)


def test_a_running_job_cancelled_while_redis_is_down_stops_at_its_next_heartbeat(
    queueing, ferry, processes, redis_server, api, user
):
    ferry(REDIS_URL=redis_server.url, HEARTBEAT_INTERVAL=0.3, HEARTBEAT_TIMEOUT=10)
    processes.worker()
    job = JobHandler.create_and_start(user, "scripted", steps=400, tick_delay=0.02, marker="m")
    wait_for(lambda: (live_progress(job.pk) or 0) > 0)

    redis_server.stop()
    response = api.post(f"/api/jobs/{job.pk}/cancel/")
    assert (response.status_code, response.json()["state"]) == (200, "started")

    wait_for(lambda: state_of(job.pk) == "cancelled", timeout=10)
    row = ScriptedJob.objects.get(pk=job.pk)
    assert 0 < row.progress_percentage < 100
    assert row.result == ""
    assert not Marker.objects.filter(name="m").exists()
    # The worker runs on_cancelled once the cancelled state is committed, so it may lag a little
    # (its publish to the stopped Redis fails first).
    wait_for(lambda: HookCall.objects.filter(job_id=job.pk).exists(), timeout=10)
    assert list(HookCall.objects.filter(job_id=job.pk).values_list("hook", flat=True)) == [
        "on_cancelled"
    ]


def test_a_cancel_recorded_while_redis_was_down_reaches_the_job_once_after_redis_returns(
    queueing, ferry, processes, redis_server, api, user
):
    # The heartbeat comes after Redis is back: the request is in the database only.
    ferry(REDIS_URL=redis_server.url, HEARTBEAT_INTERVAL=1.5, HEARTBEAT_TIMEOUT=10)
    worker = processes.worker()
    job = JobHandler.create_and_start(user, "scripted", steps=400, tick_delay=0.02)
    wait_for(lambda: (live_progress(job.pk) or 0) > 0)

    redis_server.stop()
    assert api.post(f"/api/jobs/{job.pk}/cancel/").json()["state"] == "started"
    redis_server.start()

    wait_for(lambda: state_of(job.pk) == "cancelled", timeout=10, worker=worker)
    wait_for(lambda: hook_calls(job, "on_cancelled"), timeout=10)
    # The request stays recorded, and is read at every beat, but the job ends once; the next
    # job on the worker is not touched by it.
    after = JobHandler.create_and_start(user, "scripted", steps=100, tick_delay=0.02)
    wait_for(lambda: state_of(after.pk) == "finished", timeout=15, worker=worker)
    assert hook_calls(job, "on_cancelled") == 1
    assert api.get(f"/api/jobs/{job.pk}/").json()["state"] == "cancelled"


def test_a_job_run_without_heartbeat_still_gets_a_cancel_recorded_while_redis_is_down(
    queueing, ferry, processes, redis_server, api, user
):
    # heartbeat=False writes no heartbeat rows; the job's row is committed all the same, so a
    # cancel request recorded in the database must reach it.
    ferry(REDIS_URL=redis_server.url, HEARTBEAT_INTERVAL=0.3, HEARTBEAT_TIMEOUT=10)
    processes.worker(heartbeat=False)
    job = JobHandler.create_and_start(user, "scripted", steps=400, tick_delay=0.02, marker="m")
    wait_for(lambda: (live_progress(job.pk) or 0) > 0)

    redis_server.stop()
    response = api.post(f"/api/jobs/{job.pk}/cancel/")
    assert (response.status_code, response.json()["state"]) == (200, "started")

    wait_for(lambda: state_of(job.pk) != "started", timeout=15)
    assert state_of(job.pk) == "cancelled"
    assert not Marker.objects.filter(name="m").exists()
    assert not Heartbeat.objects.filter(job_id=job.pk).exists()


def test_sweep_repairs_a_snapshot_left_live_by_a_frozen_redis(
    queueing, ferry, processes, redis_server, api, user
):
    ferry(REDIS_URL=redis_server.url, HEARTBEAT_INTERVAL=0.5, HEARTBEAT_TIMEOUT=30)
    worker = processes.worker()
    # Seconds of work: a job of one second could end, and publish it, before Redis froze.
    job = JobHandler.create_and_start(user, "scripted", steps=100, tick_delay=0.05)
    wait_for(lambda: (live_progress(job.pk) or 0) > 0)

    # A frozen Redis keeps its data but times out every call, the final publish included.
    with redis_server.frozen():
        wait_for(lambda: state_of(job) == "finished", timeout=30, worker=worker)
        # Until the final publish has given up: one still waiting would get through once
        # Redis thaws.
        gave_up = f"Job {job.pk}: progress store unavailable, its end not published"
        wait_for(lambda: gave_up in worker.output(), timeout=30, worker=worker)
    assert api.get(f"/api/jobs/{job.pk}/").json()["state"] == "started"

    JobHandler.sweep_stale_jobs()

    final = api.get(f"/api/jobs/{job.pk}/").json()
    assert (final["state"], final["progress_percentage"]) == ("finished", 100)
