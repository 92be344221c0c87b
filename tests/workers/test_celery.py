"""CeleryExecutor against real ``celery worker`` processes on RabbitMQ and Redis."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

pytest.importorskip("celery", reason="celery is not installed")

from celery import Celery, _state
from celery.utils.saferepr import saferepr
from django.db import connection, transaction
from django.utils import timezone
from kombu import Producer

from task_ferry import signals
from task_ferry.exceptions import DispatchError
from task_ferry.executors.base import get_executor
from task_ferry.executors.celery import (
    CLEANUP_OLD_JOBS_TASK,
    RUN_JOB_TASK,
    SWEEP_STALE_JOBS_TASK,
    CeleryExecutor,
    beat_schedule,
    describe_error,
)
from task_ferry.handler import JobHandler
from task_ferry.models import Heartbeat, Job
from tests.backends import end_sessions, our_session_id
from tests.ports import free_port
from tests.testapp.job_types import RoutedJobType
from tests.testapp.models import HookCall, Marker, ScriptedJob
from tests.waiting import wait_for
from tests.workers import celery_fixtures
from tests.workers.celery_fixtures import (
    BROKER_URLS,
    CeleryProcess,
    CeleryWorker,
    Outputs,
    current_celery_app,
    start_celery,
    start_worker,
    unique_queue,
    worker_env,
)

celery_worker = celery_fixtures.celery_worker
celery_executor = celery_fixtures.celery_executor
redis_celery_worker = celery_fixtures.redis_celery_worker


def state_of(job_id: int) -> str:
    return Job.objects.values_list("state", flat=True).get(pk=job_id)


def wait_for_state(job_id: int, *states: str, timeout: float = 20) -> ScriptedJob:
    wait_for(lambda: state_of(job_id) in states, timeout=timeout)
    return ScriptedJob.objects.get(pk=job_id)


def hook_calls(job_id: int, hook: str) -> int:
    return HookCall.objects.filter(job_id=job_id, hook=hook).count()


@pytest.mark.worker
def test_job_runs_to_finished(celery_executor: CeleryWorker, user) -> None:
    job = JobHandler.create_and_start(user, "scripted", steps=5, marker="finished-run")

    assert job.state == "pending"
    done = wait_for_state(job.pk, "finished", "failed")
    assert done.state == "finished"
    assert done.result == "done"
    assert done.progress_percentage == 100
    assert Marker.objects.filter(name="finished-run").count() == 1


@pytest.mark.worker
def test_a_batch_of_jobs_runs_to_finished(celery_executor: CeleryWorker, user) -> None:
    jobs = JobHandler.create_and_start_many(
        user, "scripted", [{"steps": 2, "marker": f"batch {i}"} for i in range(5)]
    )

    for job in jobs:
        assert wait_for_state(job.pk, "finished", "failed").state == "finished"
    assert Marker.objects.filter(name__startswith="batch ").count() == 5


@pytest.mark.worker
def test_failing_job_is_marked_failed(celery_executor: CeleryWorker, user) -> None:
    job = JobHandler.create_and_start(user, "scripted", steps=5, fail_at=2, marker="failed-run")

    failed = wait_for_state(job.pk, "finished", "failed")
    assert failed.state == "failed"
    assert failed.error == "RuntimeError: scripted failure at step 2"
    assert failed.human_readable_error
    assert "scripted failure" not in failed.human_readable_error
    # The job's own writes are rolled back; the hook runs once.
    assert not Marker.objects.filter(name="failed-run").exists()
    wait_for(lambda: hook_calls(job.pk, "on_error") == 1)


@pytest.mark.worker
def test_a_job_past_its_time_limit_is_stopped_and_failed(
    celery_executor: CeleryWorker, user
) -> None:
    # Ten seconds of ticks, for a type whose runs may take half a second.
    job = JobHandler.create_and_start(
        user, "time_limited", steps=1000, tick_delay=0.01, marker="timed-out-run"
    )

    failed = wait_for_state(job.pk, "finished", "failed")
    assert failed.state == "failed"
    assert failed.error == "JobTimeLimitExceeded: The job ran longer than its time limit of 0.5 s."
    assert 0 < failed.progress_percentage < 100
    assert not Marker.objects.filter(name="timed-out-run").exists()
    wait_for(lambda: hook_calls(job.pk, "on_error") == 1)


@pytest.mark.worker
def test_a_time_limited_run_that_stops_ticking_is_killed_and_its_job_failed_at_once(
    celery_executor: CeleryWorker, user, settings
) -> None:
    # The message carries Celery's hard time limit: 0.5 s of time_limit and 1 s of grace.
    settings.TASK_FERRY = {**settings.TASK_FERRY, "CELERY_TIME_LIMIT_GRACE": 1}
    # Thirty seconds without a tick, for a type whose runs may take half a second: the
    # cooperative stop never comes. The run holds SIGTERM off: the pool SIGKILLs it.
    job = JobHandler.create_and_start(
        user, "time_limited", steps=1, block_for=30, marker="killed-run"
    )

    # Failed by the worker within seconds, not by the stale-job sweep a minute later (which no
    # test worker runs).
    failed = wait_for_state(job.pk, "finished", "failed", timeout=20)
    assert failed.state == "failed"
    assert failed.error == "JobTimeLimitExceeded: The job ran longer than its time limit of 0.5 s."
    assert (
        failed.human_readable_error == "This job took longer than it is allowed to and was stopped."
    )
    assert failed.finished_at is not None
    # The killed run's transaction died with it; on_error runs once, given the type's limit.
    assert not Marker.objects.filter(name="killed-run").exists()
    wait_for(lambda: hook_calls(job.pk, "on_error") == 1)
    on_error = HookCall.objects.get(job_id=job.pk, hook="on_error")
    assert on_error.detail == "The job ran longer than its time limit of 0.5 s."
    celery_executor.process.wait_for_log("Hard time limit (2s) exceeded")
    # By the worker's main process: the killed run could say nothing.
    failed_line = f"Job {job.pk} (time_limited) failed: The job ran longer than its time limit"
    celery_executor.process.wait_for_log(failed_line)
    [line] = [line for line in celery_executor.process.log().splitlines() if failed_line in line]
    assert "/MainProcess]" in line
    assert failed.traceback == ""
    # The pool replaced the killed process: the next job runs.
    after = JobHandler.create_and_start(user, "scripted", steps=2)
    assert wait_for_state(after.pk, "finished", "failed").state == "finished"


@pytest.mark.worker
def test_an_autocommit_run_commits_as_it_goes_and_keeps_its_writes_when_it_fails(
    celery_executor: CeleryWorker, user
) -> None:
    job = JobHandler.create_and_start(
        user, "autocommit", steps=3, block_for=3, fail_at=1, marker="kept-run"
    )

    # Seen from here while the run still blocks: committed at once, not at the run's end.
    wait_for(lambda: Marker.objects.filter(name="kept-run").exists())
    assert state_of(job.pk) == "started"
    failed = wait_for_state(job.pk, "finished", "failed")
    assert failed.state == "failed"
    assert failed.error == "RuntimeError: scripted failure at step 1"
    assert Marker.objects.filter(name="kept-run").count() == 1
    wait_for(lambda: hook_calls(job.pk, "on_error") == 1)


@pytest.mark.worker
def test_running_job_is_cancelled(celery_executor: CeleryWorker, user) -> None:
    job = JobHandler.create_and_start(
        user, "scripted", steps=200, tick_delay=0.05, marker="cancelled-run"
    )
    wait_for_state(job.pk, "started")

    JobHandler.cancel(user, job.pk)

    cancelled = wait_for_state(job.pk, "cancelled", "finished", "failed", timeout=5)
    assert cancelled.state == "cancelled"
    assert 0 <= cancelled.progress_percentage < 100
    assert not Marker.objects.filter(name="cancelled-run").exists()
    wait_for(lambda: hook_calls(job.pk, "on_cancelled") == 1)


@pytest.fixture(params=["redis", "amqp"])
def two_workers(request, settings, transactional_db) -> Iterator[list[CeleryProcess]]:
    """Two workers of one process each on one queue, as on two hosts: they share nothing but
    the broker, the database and the progress store."""
    broker = request.param
    queue = unique_queue(f"two-hosts-{broker}")
    app = Celery(f"tf-tests-two-{broker}", broker=BROKER_URLS[broker], set_as_current=False)
    workers = [start_worker(BROKER_URLS[broker], [queue], concurrency=1) for _ in range(2)]
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": queue,
    }
    try:
        with current_celery_app(app):
            yield workers
    finally:
        for worker in workers:
            worker.stop()
        CeleryWorker(broker, queue, workers[0], app).purge(queue)
        app.close()


def jobs_received(worker: CeleryProcess) -> int:
    return len(re.findall(r"Task task_ferry\.run_job\[[^\]]+\] received", worker.log()))


@pytest.mark.worker
def test_two_workers_share_a_queue_and_a_cancel_reaches_each_job_where_it_runs(
    two_workers: list[CeleryProcess], user
) -> None:
    first, second = (
        JobHandler.create_and_start(user, "scripted", steps=400, tick_delay=0.05) for _ in range(2)
    )
    wait_for_state(first.pk, "started")
    wait_for_state(second.pk, "started")
    # One process and one message at a time each (worker_prefetch_multiplier = 1, acks_late):
    # the worker running the first job cannot hold the second.
    assert [jobs_received(worker) for worker in two_workers] == [1, 1]

    for job in (first, second):
        JobHandler.cancel(user, job.pk)
    for job in (first, second):
        ended = wait_for_state(job.pk, "cancelled", "finished", "failed", timeout=5)
        assert ended.state == "cancelled"
        wait_for(lambda job=job: hook_calls(job.pk, "on_cancelled") == 1)

    # A fan-out spreads over both workers and runs once.
    jobs = JobHandler.create_and_start_many(
        user, "scripted", [{"steps": 2, "tick_delay": 0.02}] * 20
    )
    for job in jobs:
        assert wait_for_state(job.pk, "finished", "failed").state == "finished"
    taken = [jobs_received(worker) - 1 for worker in two_workers]
    assert sum(taken) == 20 and min(taken) > 0, taken


@pytest.mark.worker
def test_progress_is_visible_through_the_api_while_the_job_runs(
    celery_executor: CeleryWorker, user, api
) -> None:
    job = JobHandler.create_and_start(user, "scripted", steps=20, tick_delay=0.1)

    seen: list[tuple[str, int, str]] = []

    def poll() -> bool:
        body = api.get(f"/api/jobs/{job.pk}/").json()
        seen.append((body["state"], body["progress_percentage"], body["progress_state"]))
        return body["state"] in ("finished", "failed", "cancelled")

    wait_for(poll, timeout=20, interval=0.1)
    midway = [s for s in seen if s[0] == "started" and 0 < s[1] < 100]
    assert midway, f"no progress seen while running: {seen}"
    assert any(label.startswith("step ") for _, _, label in midway)
    percentages = [p for _, p, _ in seen]
    assert percentages == sorted(percentages)
    assert seen[-1][:2] == ("finished", 100)


@pytest.mark.worker
def test_job_type_queue_routes_the_job(
    celery_executor: CeleryWorker, user, monkeypatch: pytest.MonkeyPatch
) -> None:
    special = unique_queue(f"special-{celery_executor.broker}")
    monkeypatch.setattr(RoutedJobType, "queue", special)

    job = JobHandler.create_and_start(user, "routed", steps=3)

    # The worker listens on the default queue only: the message waits in the type's queue.
    time.sleep(1.5)
    assert state_of(job.pk) == "pending"
    assert celery_executor.message_count(special) == 1
    celery_executor.add_consumer(special)
    try:
        assert wait_for_state(job.pk, "finished", "failed").state == "finished"
    finally:
        celery_executor.cancel_consumer(special)


@pytest.fixture
def private_redis_broker(transactional_db) -> Iterator[str]:
    """A redis-server of our own: a worker started without -Q consumes Celery's ``celery``
    queue there, which no other test run shares."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _accepts(port), timeout=10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(5)


@pytest.mark.worker
@pytest.mark.parametrize(
    "queue_option, celery_executor, warned, told",
    [
        (None, True, True, False),
        ("{default}", True, False, True),
        ("{default},special", True, False, False),
        (None, False, False, False),
    ],
    ids=["without -Q", "-Q default", "-Q default,special", "ImmediateExecutor"],
)
def test_a_worker_consuming_none_of_the_jobs_queues_warns_at_start(
    private_redis_broker: str,
    queue_option: str | None,
    celery_executor: bool,
    warned: bool,
    told: bool,
) -> None:
    """The test project's job types go to CELERY_QUEUE and to RoutedJobType's "special"."""
    default = unique_queue("hint-default")
    args = ["worker", "--pool=solo", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
    if queue_option is not None:
        args.append(f"--queues={queue_option.format(default=default)}")
    extra = {"TASK_FERRY_TEST_CELERY_QUEUE": default} if celery_executor else {}
    env = worker_env(private_redis_broker, **extra)
    worker = start_celery(args, env, ready_text=" ready.")
    worker.stop()
    log = worker.log()

    warning = (
        f"WARNING/MainProcess] This worker consumes the queue(s) celery, and task_ferry sends "
        f"jobs to special, {default}: it will run none of them, and they stay pending until a "
        f"worker consumes their queue. Start it with -Q: celery -A tests.celery_app worker -Q "
        f"celery,special,{default}"
    )
    info = (
        f"INFO/MainProcess] This worker takes the tasks sent to the queue(s) {default}; those "
        f"sent to special need a worker started with -Q special."
    )
    assert (warning in log) is warned, log
    assert (info in log) is told, log
    assert ("This worker" in log) is (warned or told), log


def check_lines(log: str) -> list[tuple[str, str, str]]:
    """The level, id and text of each line a worker logged for task_ferry's system checks."""
    return re.findall(r"(\w+)/MainProcess\] System check \((task_ferry\.\w+)\): (.*)", log)


@pytest.mark.worker
@pytest.mark.parametrize(
    "setup, expected",
    [
        ("misspelt", [("ERROR", "task_ferry.E002"), ("WARNING", "task_ferry.W003")]),
        ("redis down", [("WARNING", "task_ferry.W001")]),
        ("forgotten executor", [("WARNING", "task_ferry.W014")]),
        ("as documented", []),
    ],
)
def test_a_worker_logs_what_the_system_checks_find_in_its_settings_at_start(
    private_redis_broker: str, setup: str, expected: list[tuple[str, str]]
) -> None:
    """No ``check`` runs with a worker's settings: a worker whose TASK_FERRY said "REDIS_ULR"
    wrote progress and looked for cancel requests in its own LocMemCache, the web process
    showed "started 0%" for the whole run, and nothing said why."""
    default = unique_queue("checks-default")
    args = ["worker", "--pool=solo", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
    args.append(f"--queues={default},special")
    extra = {} if setup == "forgotten executor" else {"TASK_FERRY_TEST_CELERY_QUEUE": default}
    if setup == "misspelt":
        extra["TASK_FERRY_TEST_MISSPELT_REDIS_URL"] = "1"
    if setup == "redis down":
        extra["TASK_FERRY_TEST_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    worker = start_celery(args, worker_env(private_redis_broker, **extra), ready_text=" ready.")
    worker.stop()
    log = worker.log()

    lines = check_lines(log)
    assert [(level, check_id) for level, check_id, _text in lines] == expected, log
    assert "checks have not ended" not in log
    # Logged before the worker says it is ready, and it started all the same.
    assert log.index(" ready.") > max((log.index(text) for *_, text in lines), default=0)
    if setup == "misspelt":
        assert "'REDIS_ULR' (did you mean 'REDIS_URL'?)" in lines[0][2]
        assert "HINT: Valid keys are: " in lines[0][2]
    if setup == "forgotten executor":
        text = lines[0][2]
        assert (
            "TASK_FERRY['EXECUTOR'] is 'task_ferry.executors.immediate.ImmediateExecutor'" in text
        )
        assert "If the web processes run with these same settings" in text


@pytest.mark.worker
def test_pending_job_cancelled_before_a_worker_takes_it_never_runs(
    celery_executor: CeleryWorker, user, monkeypatch: pytest.MonkeyPatch
) -> None:
    parked = unique_queue(f"parked-{celery_executor.broker}")
    monkeypatch.setattr(RoutedJobType, "queue", parked)
    job = JobHandler.create_and_start(user, "routed", steps=3, marker="never")

    JobHandler.cancel(user, job.pk)
    assert job.state == "cancelled"
    assert hook_calls(job.pk, "on_cancelled") == 1

    # Now a worker takes the message: it must leave the cancelled job alone.
    celery_executor.add_consumer(parked)
    try:
        celery_executor.process.wait_for_log(f"Job {job.pk} is not pending; not running it.")
    finally:
        celery_executor.cancel_consumer(parked)
    assert state_of(job.pk) == "cancelled"
    assert not Marker.objects.filter(name="never").exists()
    assert hook_calls(job.pk, "on_cancelled") == 1


@pytest.mark.worker
def test_rolled_back_create_dispatches_nothing(
    celery_executor: CeleryWorker, user, monkeypatch: pytest.MonkeyPatch
) -> None:
    parked = unique_queue(f"rollback-{celery_executor.broker}")
    monkeypatch.setattr(RoutedJobType, "queue", parked)

    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = JobHandler.create_and_start(user, "routed", steps=1)
        raise RuntimeError("abort the request")
    with transaction.atomic():
        committed = JobHandler.create_and_start(user, "routed", steps=1)
        # Nothing is sent before the commit.
        assert celery_executor.message_count(parked) == 0

    assert celery_executor.message_count(parked) == 1
    assert not Job.objects.filter(pk=rolled_back.pk).exists()
    assert state_of(committed.pk) == "pending"
    celery_executor.purge(parked)


@pytest.mark.worker
def test_redelivered_job_never_runs_twice_at_once(
    redis_celery_worker: CeleryWorker, celery_executor: CeleryWorker, user
) -> None:
    job = JobHandler.create_and_start(
        user, "scripted", steps=20, tick_delay=0.05, marker="delivered-twice"
    )
    # A second delivery of the same job while the first runs, as a broker redelivery would.
    celery_executor.app.send_task(RUN_JOB_TASK, args=(job.pk,), queue=celery_executor.queue)

    celery_executor.process.wait_for_log(f"Job {job.pk} is not pending; not running it.")
    assert state_of(job.pk) == "started"
    assert wait_for_state(job.pk, "finished", "failed").state == "finished"
    assert Marker.objects.filter(name="delivered-twice").count() == 1
    assert celery_executor.process.log().count(f"Job {job.pk} is not pending") == 1


@pytest.mark.worker
def test_a_job_outlasting_the_visibility_timeout_is_delivered_again_but_runs_once(
    transactional_db, user, settings
) -> None:
    # The Redis broker hands the unacked message of a running job (acks_late) to a worker
    # again once its visibility timeout passes, here after a second instead of an hour.
    queue = unique_queue("visibility")
    app = Celery("tf-tests-visibility", broker=BROKER_URLS["redis"], set_as_current=False)
    process = start_worker(BROKER_URLS["redis"], [queue], TASK_FERRY_TEST_VISIBILITY_TIMEOUT="1")
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": queue,
    }
    try:
        with current_celery_app(app):
            job = JobHandler.create_and_start(
                user, "scripted", steps=60, tick_delay=0.1, marker="outlasted"
            )
        process.wait_for_log(f"Job {job.pk} was delivered again while started")
        assert state_of(job.pk) == "started"
        assert wait_for_state(job.pk, "finished", "failed", timeout=30).state == "finished"
        assert Marker.objects.filter(name="outlasted").count() == 1
        received = re.findall(rf"run_job\[job-{job.pk}-[^\]]+\] received", process.log())
        assert len(received) >= 2, process.log()
    finally:
        process.stop()
        CeleryWorker("redis", queue, process, app).purge(queue)
        app.close()


@pytest.mark.worker
def test_a_message_for_an_id_no_job_can_have_is_rejected_once_and_the_worker_goes_on(
    celery_executor: CeleryWorker, user
) -> None:
    # A forged or malformed message: the database would refuse "abc" with an error naming
    # neither the id nor the message.
    celery_executor.app.send_task(RUN_JOB_TASK, args=("abc",), queue=celery_executor.queue)
    rejected = f"Rejected a {RUN_JOB_TASK} message: Cannot run job 'abc'"
    celery_executor.process.wait_for_log(rejected)

    job = JobHandler.create_and_start(user, "scripted", steps=2, marker="after-forged")
    assert wait_for_state(job.pk, "finished", "failed").state == "finished"
    log = celery_executor.process.log()
    assert log.count(rejected) == 1  # not redelivered, not retried
    assert "DataError" not in log


@pytest.mark.worker
def test_job_of_a_killed_worker_process_is_redelivered_but_never_run_twice(
    redis_celery_worker: CeleryWorker, celery_executor: CeleryWorker, user, settings
) -> None:
    job = JobHandler.create_and_start(
        user, "scripted", steps=400, tick_delay=0.05, marker="killed-run"
    )
    wait_for_state(job.pk, "started")

    # SIGKILL the pool processes, as an OOM killer would; the worker's main process lives on.
    children = subprocess.check_output(
        ["ps", "-o", "pid=", "--ppid", str(celery_executor.process.process.pid)], text=True
    ).split()
    assert children
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)

    # reject_on_worker_lost requeues the message; its redelivery finds the job started, and
    # the worker's log says which job lost its worker and what ends it.
    celery_executor.process.wait_for_log(f"Job {job.pk} is not pending; not running it.")
    warning = f"Job {job.pk} was delivered again while started: the worker that took it first"
    celery_executor.process.wait_for_log(warning)
    [line] = [line for line in celery_executor.process.log().splitlines() if warning in line]
    assert "WARNING/" in line
    assert "the stale-job sweep fails the job" in line and "HEARTBEAT_TIMEOUT" in line
    # Celery's own lines about the task (received, then again on redelivery) name the job.
    received = re.findall(
        rf"run_job\[job-{job.pk}-[^\]]+\] received", celery_executor.process.log()
    )
    assert len(received) == 2, celery_executor.process.log()
    assert state_of(job.pk) == "started"
    assert not Marker.objects.filter(name="killed-run").exists()

    # The stale-job sweep ends it once its heartbeat is overdue.
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_TIMEOUT": 1}
    time.sleep(1.1)
    assert JobHandler.sweep_stale_jobs() == 1
    assert state_of(job.pk) == "failed"


@pytest.mark.worker
def test_job_runs_after_the_workers_database_connections_were_killed(
    redis_celery_worker: CeleryWorker, celery_executor: CeleryWorker, user
) -> None:
    warm_up = JobHandler.create_and_start(user, "scripted", steps=1)
    wait_for_state(warm_up.pk, "finished")
    assert end_sessions() >= 1

    job = JobHandler.create_and_start(user, "scripted", steps=3, marker="after-kill")

    assert wait_for_state(job.pk, "finished", "failed").state == "finished"
    assert Marker.objects.filter(name="after-kill").count() == 1


@pytest.mark.worker
def test_beat_schedule_runs_cleanup_and_sweep_in_a_worker(
    redis_celery_worker: CeleryWorker, celery_executor: CeleryWorker, user
) -> None:
    long_ago = timezone.now() - datetime.timedelta(days=30)
    expired = JobHandler.create_and_start(user, "scripted", steps=1)
    wait_for_state(expired.pk, "finished")
    Job.objects.filter(pk=expired.pk).update(finished_at=long_ago)
    # A started job whose worker vanished: no heartbeat for far longer than HEARTBEAT_TIMEOUT.
    lost = JobHandler.create_and_start(user, "scripted", steps=1)
    wait_for_state(lost.pk, "finished")
    Job.objects.filter(pk=lost.pk).update(state="started", started_at=long_ago, finished_at=None)
    Heartbeat.objects.filter(job_id=lost.pk).delete()

    env = worker_env(
        celery_executor.app.conf.broker_url,
        TASK_FERRY_TEST_BEAT_EVERY="0.5",
        TASK_FERRY_TEST_BEAT_QUEUE=celery_executor.queue,
    )
    schedule = redis_celery_worker.process.log_path.with_suffix(".beat-schedule")
    beat = start_celery(
        ["beat", f"--schedule={schedule}", "--loglevel=INFO"], env, ready_text="beat: Starting"
    )
    both = Outputs([beat, redis_celery_worker.process])
    try:
        wait_for(
            lambda: not Job.objects.filter(pk=expired.pk).exists(),
            timeout=20,
            what="the beat's cleanup to delete the expired job",
            worker=both,
        )
        wait_for(
            lambda: Job.objects.filter(pk=lost.pk, state="failed").exists(),
            timeout=20,
            what="the beat's sweep to fail the lost job",
            worker=both,
        )
    finally:
        beat.stop()
    assert "worker lost" in Job.objects.get(pk=lost.pk).error
    assert hook_calls(expired.pk, "before_delete") == 1
    assert hook_calls(lost.pk, "on_error") == 1


@pytest.fixture
def one_process_worker(transactional_db) -> Iterator[CeleryWorker]:
    """A worker of one process on a queue of its own (Redis broker): every task it gets runs
    on the same database connection."""
    queue = unique_queue("one-process")
    app = Celery("tf-tests-one-process", broker=BROKER_URLS["redis"], set_as_current=False)
    process = start_worker(BROKER_URLS["redis"], [queue], concurrency=1)
    worker = CeleryWorker("redis", queue, process, app)
    try:
        yield worker
    finally:
        process.stop()
        worker.purge(queue)
        app.close()


@pytest.mark.worker
def test_beat_tasks_run_after_the_workers_database_connection_was_killed(
    one_process_worker: CeleryWorker, user, settings
) -> None:
    # With CELERY_DB_REUSE_MAX, Celery closes a dead connection only after 2 x that many tasks:
    # the cleanup and the sweep must reconnect themselves, as run_job does.
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": one_process_worker.queue,
    }
    long_ago = timezone.now() - datetime.timedelta(days=30)
    with current_celery_app(one_process_worker.app):
        expired = JobHandler.create_and_start(user, "scripted", steps=1)
        lost = JobHandler.create_and_start(user, "scripted", steps=1)
        wait_for_state(expired.pk, "finished")
        wait_for_state(lost.pk, "finished")
    Job.objects.filter(pk=expired.pk).update(finished_at=long_ago)
    Job.objects.filter(pk=lost.pk).update(state="started", started_at=long_ago, finished_at=None)
    Heartbeat.objects.filter(job_id=lost.pk).delete()
    assert end_sessions() >= 1  # the worker's connection, as a database restart would

    for task in (CLEANUP_OLD_JOBS_TASK, SWEEP_STALE_JOBS_TASK):
        one_process_worker.app.send_task(task, queue=one_process_worker.queue)

    wait_for(
        lambda: not Job.objects.filter(pk=expired.pk).exists(),
        what="the cleanup to delete the expired job",
        worker=one_process_worker.process,
    )
    wait_for(
        lambda: Job.objects.filter(pk=lost.pk, state="failed").exists(),
        what="the sweep to fail the lost job",
        worker=one_process_worker.process,
    )
    assert hook_calls(expired.pk, "before_delete") == 1
    assert hook_calls(lost.pk, "on_error") == 1


def test_beat_schedule_entries() -> None:
    entries = beat_schedule(sweep_every=30, queue="maintenance")

    assert {e["task"] for e in entries.values()} == {
        "task_ferry.cleanup_old_jobs",
        "task_ferry.sweep_stale_jobs",
    }
    assert entries["task_ferry.sweep_stale_jobs"]["schedule"] == 30
    assert all(e["options"] == {"queue": "maintenance"} for e in entries.values())


@pytest.fixture
def own_redis_broker(transactional_db, settings):
    """A redis-server of our own as the broker, so the test can stop it."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    app = Celery("tf-tests-own-broker", broker=f"redis://127.0.0.1:{port}/0")
    try:
        wait_for(lambda: _accepts(port), timeout=10)
        settings.TASK_FERRY = {
            **settings.TASK_FERRY,
            "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
            "CELERY_QUEUE": unique_queue("own-broker"),
        }
        with current_celery_app(app):
            yield server, app
    finally:
        app.close()
        if server.poll() is None:
            server.terminate()
            server.wait(5)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.worker
def test_broker_down_fails_the_job_and_raises(own_redis_broker, user) -> None:
    server, _app = own_redis_broker
    reachable = JobHandler.create_and_start(user, "scripted", steps=1)
    assert state_of(reachable.pk) == "pending"
    server.terminate()
    server.wait(5)

    started = time.monotonic()
    with pytest.raises(DispatchError, match="could not be sent to the Celery queue"):
        JobHandler.create_and_start(user, "scripted", steps=1)
    assert time.monotonic() - started < 10

    failed = ScriptedJob.objects.exclude(pk=reachable.pk).get()
    assert failed.state == "failed"
    assert "could not be reached" in failed.human_readable_error
    assert "own-broker" in failed.error
    assert hook_calls(failed.pk, "on_error") == 1
    assert state_of(reachable.pk) == "pending"


@pytest.mark.direct_connection  # ends its server session
@pytest.mark.worker
def test_broker_and_database_both_lost_raise_the_brokers_error(own_redis_broker, user) -> None:
    # A host losing its network loses both: the error to fix first is still the broker's.
    server, _app = own_redis_broker
    server.terminate()
    server.wait(5)
    session = our_session_id()

    def lose_the_database(sender, job, **kwargs):
        # Ended from another connection (a thread has its own), once the job's row is in.
        ender = threading.Thread(target=lambda: (end_sessions([session]), connection.close()))
        ender.start()
        ender.join(10)

    signals.job_created.connect(lose_the_database)
    try:
        with pytest.raises(DispatchError, match="could not be sent to the Celery queue") as raised:
            JobHandler.create_and_start(user, "scripted", steps=1)
    finally:
        signals.job_created.disconnect(lose_the_database)
        connection.close()
    assert "could not be marked failed (see the log)" in str(raised.value)
    # Nothing ran it and nothing failed it: pending, for the sweep.
    assert ScriptedJob.objects.get().state == "pending"


@pytest.mark.direct_connection  # ends its server session
@pytest.mark.worker
def test_broker_and_database_both_lost_in_a_batch_say_its_jobs_stay_pending(
    own_redis_broker, user
) -> None:
    server, _app = own_redis_broker
    server.terminate()
    server.wait(5)
    session = our_session_id()

    def lose_the_database():
        ender = threading.Thread(target=lambda: (end_sessions([session]), connection.close()))
        ender.start()
        ender.join(10)

    def once_committed(sender, job, **kwargs):
        # Before the dispatch's own callback, which create_and_start_many() adds after these.
        if not transaction.get_connection().run_on_commit:
            transaction.on_commit(lose_the_database)

    signals.job_created.connect(once_committed)
    try:
        with pytest.raises(DispatchError, match="could not all be sent") as raised:
            JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}, {"steps": 1}])
    finally:
        signals.job_created.disconnect(once_committed)
        connection.close()
    assert "None of them could be marked failed (see the log)" in str(raised.value)
    assert "was marked failed" not in str(raised.value)
    assert sorted(ScriptedJob.objects.values_list("state", flat=True)) == ["pending", "pending"]


@pytest.mark.worker
def test_api_create_with_the_broker_down_is_201_with_the_job_failed(
    own_redis_broker, user, api
) -> None:
    server, _app = own_redis_broker
    server.terminate()
    server.wait(5)

    response = api.post("/api/jobs/", {"type": "scripted", "steps": 1}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["state"] == "failed"
    assert "could not be reached" in body["human_readable_error"]
    assert state_of(body["id"]) == "failed"


def test_a_broker_that_refuses_the_login_fails_the_job_and_the_advice_fits(
    transactional_db, settings, user
) -> None:
    """RabbitMQ refusing the credentials is not a broker that is down: the error's advice
    covers both."""
    scheme, rest = BROKER_URLS["amqp"].split("://", 1)
    app = Celery(
        "tf-tests-refused-login",
        broker=f"{scheme}://task-ferry-nobody:wrong@{rest.rsplit('@', 1)[-1]}",
        set_as_current=False,
    )
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": unique_queue("refused-login"),
    }
    try:
        with current_celery_app(app), pytest.raises(DispatchError) as raised:
            JobHandler.create_and_start(user, "scripted", steps=1)
    finally:
        app.close()
    assert "ACCESS_REFUSED" in str(raised.value)
    assert str(raised.value).endswith(
        "The job was marked failed. Check the broker URL and that the broker is running."
    )
    assert ScriptedJob.objects.get().state == "failed"


@pytest.mark.worker
def test_the_dispatch_error_names_the_jobs_of_its_transaction_it_failed_too(
    own_redis_broker, user
) -> None:
    server, _app = own_redis_broker
    with pytest.raises(DispatchError) as raised, transaction.atomic():
        jobs = [JobHandler.create_and_start(user, "scripted", steps=1) for _ in range(3)]
        server.terminate()
        server.wait(5)

    first, *later = jobs
    assert f"Job {first.pk} could not be sent" in str(raised.value)
    assert f"The 2 job(s) after it in the same transaction (ids {later[0].pk} to " in str(
        raised.value
    )
    assert [state_of(job.pk) for job in jobs] == ["failed"] * 3


@pytest.mark.worker
def test_a_job_started_by_a_commit_hook_leaves_the_transactions_unsent_jobs_to_fail(
    own_redis_broker, user
) -> None:
    """A commit hook of the transaction starts a job in a transaction of its own, then the
    broker goes away: every job the first transaction could not send any more is failed."""
    server, _app = own_redis_broker

    def start_another_job_then_lose_the_broker() -> None:
        with transaction.atomic():
            JobHandler.create_and_start(user, "scripted", steps=1)
        server.terminate()
        server.wait(5)

    with pytest.raises(DispatchError), transaction.atomic():
        sent = JobHandler.create_and_start(user, "scripted", steps=1)
        transaction.on_commit(start_another_job_then_lose_the_broker)
        refused = JobHandler.create_and_start(user, "scripted", steps=1)
        never_sent = JobHandler.create_and_start(user, "scripted", steps=1)

    assert state_of(sent.pk) == "pending"
    assert [state_of(refused.pk), state_of(never_sent.pk)] == ["failed", "failed"]
    started_by_hook = ScriptedJob.objects.exclude(pk__in=[sent.pk, refused.pk, never_sent.pk])
    assert [job.state for job in started_by_hook] == ["pending"]


def test_the_broker_lost_leaves_alone_the_job_that_took_the_id_of_one_rolled_back_with_a_savepoint(
    own_redis_broker, user
) -> None:
    """On SQLite the id of a job rolled back with a savepoint goes to the next job created, here
    by a commit hook of the transaction that then loses the broker. The hook's job, sent, is
    not failed in the rolled-back one's place, and the error counts only the jobs it failed."""
    server, _app = own_redis_broker
    started_by_hook = []

    def start_another_job_then_lose_the_broker() -> None:
        with transaction.atomic():
            started_by_hook.append(JobHandler.create_and_start(user, "scripted", steps=1))
        server.terminate()
        server.wait(5)

    with pytest.raises(DispatchError) as raised, transaction.atomic():
        transaction.on_commit(start_another_job_then_lose_the_broker)
        refused = JobHandler.create_and_start(user, "scripted", steps=1)
        never_sent = JobHandler.create_and_start(user, "scripted", steps=1)
        with pytest.raises(RuntimeError), transaction.atomic():
            rolled_back = JobHandler.create_and_start(user, "scripted", steps=1)
            raise RuntimeError

    [hook_job] = started_by_hook
    if connection.vendor == "sqlite":
        assert hook_job.pk == rolled_back.pk
    assert state_of(hook_job.pk) == "pending"
    assert [state_of(refused.pk), state_of(never_sent.pk)] == ["failed", "failed"]
    assert (
        f"The 1 job(s) after it in the same transaction (id {never_sent.pk}) were marked failed"
        in str(raised.value)
    )


@pytest.mark.worker
def test_a_broker_restart_between_two_jobs_is_ridden_out(own_redis_broker, user, settings) -> None:
    import redis

    server, app = own_redis_broker
    port = app.connection_for_write().port
    JobHandler.create_and_start(user, "scripted", steps=1)
    # The executor keeps this thread's connection; the broker it was made to goes away and a new
    # one (empty: Redis keeps nothing on disk here) comes up on the same port.
    server.terminate()
    server.wait(5)
    restarted = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _accepts(port), timeout=10)
        job = JobHandler.create_and_start(user, "scripted", steps=1)
        assert state_of(job.pk) == "pending"
        queue = settings.TASK_FERRY["CELERY_QUEUE"]
        assert redis.Redis(port=port).llen(queue) == 1  # the second job's message, sent again
    finally:
        restarted.terminate()
        restarted.wait(5)


@pytest.mark.worker
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
def test_a_rabbitmq_connection_closed_by_the_broker_is_ridden_out(
    transactional_db, settings, user
) -> None:
    queue = unique_queue("closed-by-broker")
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": queue,
    }
    app = Celery("tf-tests-closed-by-broker", broker=celery_fixtures.BROKER_URLS["amqp"])
    try:
        with current_celery_app(app):
            jobs = [JobHandler.create_and_start(user, "scripted", steps=1) for _ in range(2)]
            # The broker closes the executor's connection (a RabbitMQ restart, a network blip,
            # an operator); the executor only finds out at its next send.
            _app, _pid, executor_connection, _producer = get_executor()._local.connection
            local_port = executor_connection.connection.sock.getsockname()[1]
            subprocess.run(
                ["rabbitmqctl", "close_connection", rabbitmq_connection_from(local_port), "test"],
                check=True,
                capture_output=True,
            )
            jobs += [JobHandler.create_and_start(user, "scripted", steps=1) for _ in range(2)]
        with app.connection_for_write() as connection:
            channel = connection.channel()
            queued = channel.queue_declare(queue, passive=True).message_count
            channel.queue_delete(queue)
    finally:
        app.close()
    assert queued == 4
    assert {state_of(job.pk) for job in jobs} == {"pending"}


def rabbitmq_connection_from(local_port: int) -> str:
    """The process id RabbitMQ gives the connection from this machine's ``local_port``."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "--no-table-headers", "--quiet", "pid", "name"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    [pid] = [line.split("\t")[0] for line in listed if f"\t127.0.0.1:{local_port} -> " in line]
    return pid


@pytest.mark.worker
def test_after_its_first_send_a_thread_builds_nothing_per_message(
    own_redis_broker, user, settings, monkeypatch
) -> None:
    import redis
    from kombu.abstract import MaybeChannelBound

    # kombu's Redis transport builds a redis-py client per message, and binds a copy of the
    # queue (and its exchange) to the channel; the executor keeps one client and bound queue.
    built = []
    original_init = redis.Redis.__init__
    original_bind = MaybeChannelBound.bind

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original_init(self, *args, **kwargs)

    def counting_bind(self, *args, **kwargs):
        built.append(self)
        return original_bind(self, *args, **kwargs)

    _server, app = own_redis_broker
    JobHandler.create_and_start(user, "scripted", steps=1)
    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    monkeypatch.setattr(MaybeChannelBound, "bind", counting_bind)
    jobs = [JobHandler.create_and_start(user, "scripted", steps=1) for _ in range(5)]
    monkeypatch.undo()

    assert built == []
    queue = settings.TASK_FERRY["CELERY_QUEUE"]
    port = app.connection_for_write().port
    messages = [json.loads(m) for m in redis.Redis(port=port).lrange(queue, 0, -1)]
    assert len(messages) == 6
    assert {state_of(job.pk) for job in jobs} == {"pending"}
    # Routed as Celery routes a queue's name: on the default exchange, the name as routing key.
    assert {m["properties"]["delivery_info"]["routing_key"] for m in messages} == {queue}
    # Monitoring tools (Flower, celery events) show the arguments as Celery would write them.
    shown = {m["headers"]["argsrepr"]: m["headers"] for m in messages}
    for job in jobs:
        headers = shown[saferepr((job.pk, "scripted"))]
        assert (headers["task"], headers["kwargsrepr"]) == (RUN_JOB_TASK, saferepr({}))
        # ... and a task id that names the job, unique as Celery's own.
        assert re.fullmatch(rf"job-{job.pk}-[0-9a-f-]{{36}}", headers["id"])
    assert len({m["headers"]["id"] for m in messages}) == 6


@pytest.mark.worker
@pytest.mark.skipif(not hasattr(Producer, "batch"), reason="kombu before 5.7 has no batches")
def test_a_batch_of_jobs_reaches_a_redis_broker_in_one_write(
    own_redis_broker, user, settings, monkeypatch
) -> None:
    import redis
    from redis.connection import AbstractConnection

    _server, app = own_redis_broker
    JobHandler.create_and_start(user, "scripted", steps=1)  # connects and declares the queue
    writes = []
    original_send = AbstractConnection.send_packed_command

    def counting_send(self, command, *args, **kwargs):
        writes.append(command)
        return original_send(self, command, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting_send)
    jobs = JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}] * 10)
    monkeypatch.undo()

    assert len(writes) == 1
    queue = settings.TASK_FERRY["CELERY_QUEUE"]
    port = app.connection_for_write().port
    messages = [json.loads(m) for m in redis.Redis(port=port).lrange(queue, 0, -1)]
    # LPUSH puts the newest first; workers take from the other end, so the oldest runs first.
    sent = [m["headers"]["argsrepr"] for m in reversed(messages[:10])]
    assert sent == [saferepr((job.pk, "scripted")) for job in jobs]
    assert {state_of(job.pk) for job in jobs} == {"pending"}


@pytest.mark.worker
@pytest.mark.parametrize(("grace", "hard_limit"), [(60, 61), (None, None)])
def test_a_time_limited_types_messages_carry_a_hard_time_limit_past_it(
    own_redis_broker, user, settings, grace, hard_limit
) -> None:
    import redis

    _server, app = own_redis_broker
    settings.TASK_FERRY = {**settings.TASK_FERRY, "CELERY_TIME_LIMIT_GRACE": grace}
    JobHandler.create_and_start(user, "time_limited", steps=1)
    JobHandler.create_and_start(user, "scripted", steps=1)

    queue = settings.TASK_FERRY["CELERY_QUEUE"]
    port = app.connection_for_write().port
    [second, first] = [json.loads(m) for m in redis.Redis(port=port).lrange(queue, 0, -1)]
    # Celery's header: [hard, soft]. A message without limits of its own gets the worker's
    # task_time_limit, if any.
    assert first["headers"]["timelimit"] == [hard_limit, None]  # 0.5 s, then the grace
    assert second["headers"]["timelimit"] == [None, None]


@pytest.mark.worker
def test_hung_broker_fails_every_job_of_a_batch_and_none_of_them_runs(
    own_redis_broker, user
) -> None:
    server, _app = own_redis_broker
    JobHandler.create_and_start(user, "scripted", steps=1)
    server.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(DispatchError, match=r"3 jobs \(ids \d+ to \d+\) could not all"):
            JobHandler.create_and_start_many(
                user, "scripted", [{"marker": f"hung batch {i}"} for i in range(3)]
            )
        elapsed = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGCONT)

    assert elapsed < 10
    batch = list(ScriptedJob.objects.filter(marker__startswith="hung batch"))
    assert [job.state for job in batch] == ["failed"] * 3
    # The broker may still have taken some of the messages: a worker given one runs nothing.
    for job in batch:
        assert JobHandler.run_job(job.pk, job_type_name="scripted") is None
        assert state_of(job.pk) == "failed"
    assert not Marker.objects.filter(name__startswith="hung batch").exists()
    assert HookCall.objects.filter(hook="on_error", job_id__in=[j.pk for j in batch]).count() == 3


@pytest.mark.worker
def test_hung_broker_fails_the_job_within_seconds(own_redis_broker, user) -> None:
    server, _app = own_redis_broker
    JobHandler.create_and_start(user, "scripted", steps=1)
    # A frozen broker still accepts connections but never answers.
    server.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(DispatchError):
            job = JobHandler.create_and_start(user, "scripted", steps=1)
        elapsed = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGCONT)

    assert elapsed < 10
    job = ScriptedJob.objects.order_by("-pk").first()
    assert job.state == "failed"
    assert "could not be reached" in job.human_readable_error


def test_broker_on_wrong_port_fails_every_job_of_the_transaction(
    transactional_db, settings, user
) -> None:
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
    }
    app = Celery("tf-tests-wrong-port", broker=f"redis://127.0.0.1:{free_port()}/0")
    with current_celery_app(app):
        started = time.monotonic()
        with pytest.raises(DispatchError), transaction.atomic():
            first = JobHandler.create_and_start(user, "scripted", steps=1)
            second = JobHandler.create_and_start(user, "scripted", steps=1)
        elapsed = time.monotonic() - started
    app.close()

    assert elapsed < 10
    # The callers' handles follow the database.
    assert (first.state, second.state) == ("failed", "failed")
    assert [state_of(first.pk), state_of(second.pk)] == ["failed", "failed"]


def test_broker_on_wrong_port_names_the_connection_error_once(
    transactional_db, settings, user
) -> None:
    # kombu re-raises redis-py's ConnectionError as an OperationalError with the same text:
    # the job's error said it twice, once as the cause.
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
    }
    port = free_port()
    app = Celery("tf-tests-wrong-port-once", broker=f"redis://127.0.0.1:{port}/0")
    with current_celery_app(app), pytest.raises(DispatchError) as raised:
        JobHandler.create_and_start(user, "scripted", steps=1)
    app.close()

    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    assert f"connecting to 127.0.0.1:{port}" in job.error
    for text in (job.error, str(raised.value)):
        assert text.count(f"127.0.0.1:{port}.") == 1, text
        assert text.count("Connection refused") == 1, text


class CauseOfDispatchError(Exception):
    pass


def raised_from_refusal(message: str) -> RuntimeError:
    """A ``RuntimeError(message)`` raised from a refused connection, as kombu raises."""
    try:
        try:
            raise CauseOfDispatchError("Error 111 connecting to 127.0.0.1:6390.")
        except CauseOfDispatchError as cause:
            raise RuntimeError(message) from cause
    except RuntimeError as exc:
        return exc


def test_describe_error_keeps_a_cause_that_says_more() -> None:
    assert describe_error(raised_from_refusal("Delivery of the batch is uncertain")) == (
        "RuntimeError: Delivery of the batch is uncertain "
        "(CauseOfDispatchError: Error 111 connecting to 127.0.0.1:6390.)"
    )
    repeated = raised_from_refusal("Error 111 connecting to 127.0.0.1:6390.")
    assert describe_error(repeated) == "RuntimeError: Error 111 connecting to 127.0.0.1:6390."


def test_broker_down_fails_every_job_of_a_batch(transactional_db, settings, user) -> None:
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
    }
    app = Celery("tf-tests-wrong-port-batch", broker=f"redis://127.0.0.1:{free_port()}/0")
    with current_celery_app(app), pytest.raises(DispatchError, match="3 jobs .* could not all"):
        JobHandler.create_and_start_many(user, "scripted", [{}, {}, {}])
    app.close()

    assert list(Job.objects.values_list("state", flat=True)) == ["failed"] * 3
    assert HookCall.objects.filter(hook="on_error").count() == 3


def test_check_reports_a_missing_celery_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_state._tls, "current_app", None)
    monkeypatch.setattr(_state, "_apps", weakref.WeakSet())
    monkeypatch.setattr(_state, "default_app", None)

    [error] = CeleryExecutor().check()

    assert error.id == "task_ferry.E010"
    assert "no Celery app" in error.msg
    assert error.hint


def test_check_reports_celery_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "celery", None)

    [error] = CeleryExecutor().check()

    assert error.id == "task_ferry.E010"
    assert "django-task-ferry[celery]" in error.hint


def test_check_passes_with_the_project_app() -> None:
    app = Celery("tf-tests-check", set_as_current=False, broker="redis://127.0.0.1:6379/14")
    with current_celery_app(app):
        assert CeleryExecutor().check() == []
    app.close()


def test_check_warns_that_task_always_eager_does_not_run_jobs_inline() -> None:
    app = Celery("tf-tests-check", set_as_current=False, broker="redis://127.0.0.1:6379/14")
    app.conf.task_always_eager = True
    with current_celery_app(app):
        [warning] = CeleryExecutor().check()
    app.close()
    assert warning.id == "task_ferry.W012"
    assert "task_always_eager" in warning.msg and "sends them to the broker" in warning.msg
    assert "ImmediateExecutor" in warning.hint


def test_check_warns_that_a_job_types_priority_is_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Celery's brokers read a message's priority each their own way: the type's queue is the
    # way to let its jobs overtake others, and the check says so rather than drop it silently.
    monkeypatch.setattr(RoutedJobType, "priority", 10)
    app = Celery("tf-tests-check", set_as_current=False, broker="redis://127.0.0.1:6379/14")
    with current_celery_app(app):
        [warning] = CeleryExecutor().check()
    app.close()
    assert warning.id == "task_ferry.W013"
    assert warning.obj is RoutedJobType
    assert "'routed' sets priority 10" in warning.msg and "does not send" in warning.msg
    assert "RoutedJobType.queue" in warning.hint and "celery worker -Q" in warning.hint


def test_check_warns_of_an_app_without_a_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery would send every job to amqp://guest@localhost// without saying so.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL", raising=False)
    with current_celery_app(Celery("tf-tests-check", set_as_current=False)) as app:
        [warning] = CeleryExecutor().check()
        assert warning.id == "task_ferry.W011"
        assert "amqp://guest@localhost//" in warning.msg
        assert "CELERY_BROKER_URL" in warning.hint
        # The variable Celery reads from the environment counts as configured.
        monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")
        assert CeleryExecutor().check() == []
    app.close()
