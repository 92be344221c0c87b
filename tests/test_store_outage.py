"""Redis going away and coming back, with a redis-server of the test's own."""

import shutil

import pytest
from django.db import connection

from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.snapshot import cancel_token
from task_ferry.stores.base import get_store
from tests.gated import GatedJobType, start_halfway, wait_until
from tests.testapp.models import ScriptedJob
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server on PATH"
)


def wait_until_the_monitor_listens():
    """Until the worker's monitor is subscribed to cancel requests, so it hears Redis go: a
    test before may have left it waiting a second to subscribe again."""
    store = get_store()
    wait_until(
        lambda: dict(store.client.pubsub_numsub(store.cancel_channel)).get(
            store.cancel_channel.encode()
        ),
        "the monitor listens for cancel requests",
    )


def test_ticks_never_raise_and_the_db_keeps_the_outcome_while_redis_is_down(db, user, redis_server):
    redis_server.stop()
    job = JobHandler.create_and_start(user, "scripted", steps=500, marker="kept")
    row = ScriptedJob.objects.get(pk=job.pk)
    assert (row.state, row.progress_percentage, row.progress_state, row.result) == (
        "finished",
        100,
        "step 500 of 500",
        "done",
    )


def test_a_job_ending_while_redis_is_down_logs_what_polls_see_and_what_repairs_it(
    db, user, redis_server, caplog
):
    redis_server.stop()
    with caplog.at_level("WARNING", logger="task_ferry"):
        job = JobHandler.create_and_start(user, "scripted", steps=3)
    [line] = [m for m in caplog.messages if m.startswith(f"Job {job.pk}: progress store")]
    assert "its end not published" in line
    assert f"127.0.0.1:{redis_server.port}" in line  # the store's own error
    assert "Polls answer from the job's row meanwhile" in line
    assert "the first stale-job sweep after the store is back writes its end" in line


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite allows one writer at a time")
def test_publishing_and_cancel_requests_resume_when_redis_returns(
    transactional_db, user, redis_server
):
    from task_ferry.registry import job_type_registry

    JobHandler.create_and_start(user, "scripted", steps=3)  # the monitor is listening
    redis_server.stop()
    gated = job_type_registry.register(GatedJobType())
    try:
        thread, job = start_halfway(gated, user, steps=20)
        redis_server.start()
        wait_until(
            lambda: (get_store().read(job.pk) or {}).get("progress_percentage") == 50,
            "the running job's progress is published again",
        )
        # The monitor subscribes again, so a request from another process gets through.
        get_store().request_cancel(job.pk, token=cancel_token(job))
        wait_until(lambda: gated.progress.cancel_requested, "the cancel request arrived")
        gated.release.set()
        thread.finish()
    finally:
        gated.release.set()
        job_type_registry.unregister(gated)
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"
    assert get_store().read(job.pk)["state"] == "cancelled"


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite allows one writer at a time")
def test_a_redis_restart_between_two_publications_does_not_lose_a_running_jobs_progress(
    transactional_db, user, api, redis_server
):
    """Redis restarted empty (no persistence, or a failover to a fresh replica) while a job's
    progress stays put, a long step say: the monitor must publish it again once Redis is back.
    It only published changed numbers, so polls read the row (0 %) until the next tick."""
    from task_ferry.registry import job_type_registry

    gated = job_type_registry.register(GatedJobType())
    try:
        thread, job = start_halfway(gated, user, steps=20)
        wait_until(
            lambda: (get_store().read(job.pk) or {}).get("progress_percentage") == 50,
            "the running job's progress is published",
        )
        # Subscribed to cancel requests, so the monitor hears Redis go: a test before this one
        # may have left it waiting a second to subscribe again, during which the restart went
        # unnoticed.
        wait_until_the_monitor_listens()
        redis_server.stop()
        redis_server.start()
        # The monitor resubscribes within a second of Redis returning.
        wait_for(
            lambda: get_store().read(job.pk),
            timeout=3,
            what="the running job's progress is published again",
        )
        body = api.get(f"/api/jobs/{job.pk}/").json()
        assert (body["state"], body["progress_percentage"]) == ("started", 50)
        gated.release.set()
        thread.finish()
    finally:
        gated.release.set()
        job_type_registry.unregister(gated)


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite allows one writer at a time")
def test_the_worker_log_says_what_a_redis_outage_means_for_running_jobs_and_when_it_ends(
    transactional_db, user, redis_server, caplog
):
    """The one line a worker logs for an outage is what an operator sees at 3 a.m.: it says
    that jobs carry on, where cancel requests go meanwhile, and what to check."""
    from task_ferry.registry import job_type_registry

    gated = job_type_registry.register(GatedJobType())
    try:
        with caplog.at_level("WARNING", logger="task_ferry"):
            thread, job = start_halfway(gated, user, steps=20)
            wait_until_the_monitor_listens()
            redis_server.stop()
            wait_until(
                lambda: any("monitor: progress store unavailable" in m for m in caplog.messages),
                "the monitor reports the outage",
            )
            redis_server.start()
            wait_until(
                lambda: any("monitor: progress store reachable" in m for m in caplog.messages),
                "the monitor reports the store back",
            )
            gated.release.set()
            thread.finish()
    finally:
        gated.release.set()
        job_type_registry.unregister(gated)
    assert ScriptedJob.objects.get(pk=job.pk).state == "finished"  # it carried on, as said
    [down] = [m for m in caplog.messages if "monitor: progress store unavailable" in m]
    assert f"127.0.0.1:{redis_server.port}" in down  # the store's error, at the end
    assert "Running jobs carry on" in down
    assert "cancel requests reach them through the database at each heartbeat" in down
    assert "Check that the store is running and reachable from this worker." in down
    [back] = [m for m in caplog.messages if "monitor: progress store reachable" in m]
    assert "publishing progress and taking cancel requests from it again" in back


def test_deleting_many_jobs_while_redis_is_down_commits_and_logs_a_short_warning(
    transactional_db, user, no_dispatch, redis_server, caplog
):
    """The ``post_delete`` receiver cannot reach the store: the delete commits all the same
    (the snapshots expire on their own), and its warning no longer lists every deleted id,
    one log line of megabytes for a bulk delete of 100,000 jobs."""

    jobs = JobHandler.create_and_start_many(user, "scripted", [{}] * 1000)
    redis_server.stop()
    with caplog.at_level("WARNING", logger="task_ferry"):
        deleted, _ = Job.objects.filter(pk__in=[job.pk for job in jobs]).delete()
    assert deleted and not Job.objects.exists()
    warnings = [r.getMessage() for r in caplog.records if "not forgotten" in r.getMessage()]
    assert len(warnings) == 1
    assert "of 1000 deleted jobs" in warnings[0] and len(warnings[0]) < 300, warnings[0]


def test_a_cleanup_stops_calling_the_store_after_it_failed_and_says_so_once(
    transactional_db, user, redis_server, caplog
):
    """Each batch of deleted jobs would call the store again: against a Redis that hangs, a
    2-second socket timeout per 500 jobs. The run calls it once, and counts the rest."""
    from tests.reliability.bulk import bulk_jobs

    bulk_jobs(1200, user=user, types=("scripted",))
    redis_server.stop()
    with caplog.at_level("WARNING", logger="task_ferry"):
        assert JobHandler.cleanup_old_jobs() == 1200
    assert not Job.objects.exists()
    warnings = [r.getMessage() for r in caplog.records if "not forgotten" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "snapshots of 500 of 500 deleted jobs not forgotten" in warnings[0]
    assert "snapshots of 700 more deleted jobs not forgotten" in warnings[1]
