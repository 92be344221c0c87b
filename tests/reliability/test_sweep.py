"""The stale-job sweep: what it fails, what it leaves alone, and that it frees the slot."""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from task_ferry.exceptions import (
    JobTypeDoesNotExist,
    MaxJobCountExceeded,
    ProgressStoreUnavailable,
)
from task_ferry.handler import JobHandler, publish, transition
from task_ferry.models import Heartbeat, Job, JobState
from task_ferry.stores.base import get_store
from task_ferry.stores.redis import SOCKET_TIMEOUT
from tests.reliability.helpers import hook_calls, needs_row_locks, start_lost_job, state_of

pytestmark = pytest.mark.django_db


def test_lapsed_heartbeat_fails_job_as_worker_lost(queueing, user):
    job = start_lost_job(user)

    assert JobHandler.sweep_stale_jobs() == 1

    job = JobHandler.get_job(user, job.pk)
    assert job.state == JobState.FAILED
    assert "worker lost" in job.human_readable_error
    assert job.finished_at is not None
    assert hook_calls(job, "on_error") == 1


def test_a_lost_job_keeps_the_progress_it_last_published(queueing, user):
    job = start_lost_job(user)
    # What the worker's monitor published before the worker died; the row still says 0 %.
    job.progress_percentage, job.progress_state = 40, "Reading rows"
    publish(job)

    JobHandler.sweep_stale_jobs()

    failed = Job.objects.get(pk=job.pk)
    assert (failed.state, failed.progress_percentage, failed.progress_state) == (
        JobState.FAILED,
        40,
        "Reading rows",
    )
    snapshot = get_store().read(job.pk)
    assert (snapshot["state"], snapshot["progress_percentage"]) == (JobState.FAILED, 40)


def test_a_lost_job_keeps_no_progress_an_earlier_job_with_its_id_published(queueing, user):
    job = start_lost_job(user)
    # A snapshot left by an earlier job with this id (a database restored from a backup, a
    # reused id), still "started" in the store: not this job's progress.
    earlier = Job.objects.get(pk=job.pk)
    earlier.created_at -= datetime.timedelta(days=1)
    earlier.progress_percentage, earlier.progress_state = 90, "Someone else's rows"
    publish(earlier)

    JobHandler.sweep_stale_jobs()

    failed = Job.objects.get(pk=job.pk)
    assert (failed.state, failed.progress_percentage, failed.progress_state) == (
        JobState.FAILED,
        0,
        "",
    )


def test_second_sweep_changes_nothing_and_calls_no_hook_again(queueing, user):
    job = start_lost_job(user)
    JobHandler.sweep_stale_jobs()

    assert JobHandler.sweep_stale_jobs() == 0
    assert hook_calls(job, "on_error") == 1


def test_sweep_frees_the_max_count_slot(queueing, user):
    lost = [start_lost_job(user, "limited"), start_lost_job(user, "limited")]
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start(user, "limited")

    JobHandler.sweep_stale_jobs()

    assert [state_of(j) for j in lost] == ["failed", "failed"]
    assert JobHandler.create_and_start(user, "limited").state == JobState.PENDING


def test_fresh_heartbeat_and_pending_jobs_are_left_alone(queueing, ferry, user):
    ferry(HEARTBEAT_TIMEOUT=60)
    alive = start_lost_job(user, silent_for=5)
    pending = JobHandler.create_and_start(user, "scripted")

    assert JobHandler.sweep_stale_jobs() == 0
    assert state_of(alive) == "started"
    assert state_of(pending) == "pending"


def test_timeout_is_the_heartbeat_timeout_setting(queueing, ferry, user):
    job = start_lost_job(user, silent_for=30)
    ferry(HEARTBEAT_TIMEOUT=60)
    assert JobHandler.sweep_stale_jobs() == 0
    ferry(HEARTBEAT_TIMEOUT=20)
    assert JobHandler.sweep_stale_jobs() == 1
    assert state_of(job) == "failed"
    assert "20 seconds" in Job.objects.get(pk=job.pk).human_readable_error


def test_job_whose_worker_died_before_its_first_beat_is_failed_after_the_timeout(
    queueing, ferry, user
):
    # Jobs beat within HEARTBEAT_INTERVAL of their start; short jobs never need to.
    ferry(HEARTBEAT_TIMEOUT=60)
    died = JobHandler.create_and_start(user, "scripted")
    transition(died, JobState.STARTED, from_states=[JobState.PENDING])
    Job.objects.filter(pk=died.pk).update(started_at=timezone.now() - datetime.timedelta(hours=1))
    just_started = JobHandler.create_and_start(None, "scripted")
    transition(just_started, JobState.STARTED, from_states=[JobState.PENDING])

    assert JobHandler.sweep_stale_jobs() == 1
    assert state_of(died) == "failed"
    assert state_of(just_started) == "started"


def test_pending_job_older_than_pending_timeout_is_failed(queueing, ferry, user):
    ferry(PENDING_TIMEOUT=600)
    old = JobHandler.create_and_start(user, "limited")
    Job.objects.filter(pk=old.pk).update(created_at=timezone.now() - datetime.timedelta(hours=1))
    recent = JobHandler.create_and_start(user, "limited")

    assert JobHandler.sweep_stale_jobs() == 1

    old = JobHandler.get_job(user, old.pk)
    assert old.state == JobState.FAILED
    assert "No worker picked up this job" in old.human_readable_error
    assert hook_calls(old, "on_error") == 1
    assert state_of(recent) == "pending"
    # The slot is free again: one live job left of max_count=2.
    JobHandler.create_and_start(user, "limited")


def created_an_hour_ago(*jobs):
    hour_ago = timezone.now() - datetime.timedelta(hours=1)
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(created_at=hour_ago)


@pytest.mark.parametrize(
    ("executor", "default_worker", "routed_worker"),
    [
        (
            "task_ferry.executors.celery.CeleryExecutor",
            "the Celery queue 'jobs'. Check that workers are running and consume that queue "
            "(celery -A myproject worker -Q jobs)",
            "the Celery queue 'special'. Check that workers are running and consume that "
            "queue (celery -A myproject worker -Q special)",
        ),
        (
            "task_ferry.executors.django_tasks.DjangoTasksExecutor",
            "the django.tasks queue 'default' of TASKS['{alias}']. Check that workers are "
            "running and consume that queue (manage.py db_worker --backend {alias} "
            "--queue-name default)",
            "the django.tasks queue 'special' of TASKS['{alias}']. Check that workers are "
            "running and consume that queue (manage.py db_worker --backend {alias} "
            "--queue-name special)",
        ),
    ],
)
def test_a_pending_job_no_worker_took_is_failed_naming_its_queue_to_operators_only(
    queueing, ferry, user, executor, default_worker, routed_worker
):
    if "django_tasks" in executor:
        pytest.importorskip("django_tasks_db")
        project_app = contextlib.nullcontext()
    else:
        celery = pytest.importorskip("celery")
        from tests.workers.celery_fixtures import current_celery_app

        project_app = current_celery_app(celery.Celery("myproject", set_as_current=False))
    ferry(PENDING_TIMEOUT=600)
    default = JobHandler.create_and_start(user, "scripted")
    routed = JobHandler.create_and_start(user, "routed")
    created_an_hour_ago(default, routed)
    # The sweep runs where the workers' executor is configured.
    alias = ferry(EXECUTOR=executor, CELERY_QUEUE="jobs")["TASKS_BACKEND"]

    with project_app:
        assert JobHandler.sweep_stale_jobs() == 2

    for job, worker in ((default, default_worker), (routed, routed_worker)):
        failed = Job.objects.get(pk=job.pk)
        assert failed.error == (
            f"No worker picked up this job within 600 seconds from {worker.format(alias=alias)}, "
            f"then start it again."
        )
        assert failed.human_readable_error == (
            "No worker picked up this job within 600 seconds, so it never started. Try again later."
        )
        assert hook_calls(failed, "on_error") == 1


def test_naming_the_queue_costs_the_sweep_no_query(queueing, ferry, user):
    pytest.importorskip("celery")
    ferry(PENDING_TIMEOUT=600)

    def queries_of_a_sweep(executor):
        ferry(EXECUTOR="tests.reliability.executors.QueueingExecutor")
        jobs = [JobHandler.create_and_start(user, "scripted") for _ in range(3)]
        created_an_hour_ago(*jobs)
        ferry(EXECUTOR=executor)
        with CaptureQueriesContext(connection) as queries:
            assert JobHandler.sweep_stale_jobs() == 3
        return len(queries)

    assert queries_of_a_sweep("task_ferry.executors.celery.CeleryExecutor") == queries_of_a_sweep(
        "tests.reliability.executors.QueueingExecutor"
    )
    # No Celery app in this process: the command names none.
    assert "(celery worker -Q default)" in Job.objects.order_by("pk").first().error


def test_a_pending_job_of_a_removed_type_is_failed_without_a_queue_named(
    queueing, ferry, user, retired_type
):
    pytest.importorskip("celery")
    ferry(PENDING_TIMEOUT=600)
    job = JobHandler.create_and_start(user, "retired")
    created_an_hour_ago(job)
    retired_type()
    ferry(EXECUTOR="task_ferry.executors.celery.CeleryExecutor")

    assert JobHandler.sweep_stale_jobs() == 1
    assert Job.objects.get(pk=job.pk).error == (
        "No worker picked up this job within 600 seconds. Check that workers are running and "
        "consume this job's queue, then start it again."
    )


def test_pending_timeout_none_never_fails_pending_jobs(queueing, ferry, user):
    ferry(PENDING_TIMEOUT=None)
    job = JobHandler.create_and_start(user, "scripted")
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - datetime.timedelta(days=30))

    assert JobHandler.sweep_stale_jobs() == 0
    assert state_of(job) == "pending"


def test_a_hook_that_raises_does_not_stop_the_sweep(queueing, user, monkeypatch, caplog):
    from tests.testapp.job_types import ScriptedJobType

    def broken(self, job, exc):
        raise RuntimeError("hook bug")

    monkeypatch.setattr(ScriptedJobType, "on_error", broken)
    jobs = [start_lost_job(None) for _ in range(3)]

    assert JobHandler.sweep_stale_jobs() == 3
    assert [state_of(j) for j in jobs] == ["failed"] * 3
    assert caplog.text.count("on_error hook") == 3


def test_a_worker_without_the_jobs_type_fails_it_with_a_clear_error(queueing, user, retired_type):
    job = JobHandler.create_and_start(user, "retired")
    retired_type()
    with pytest.raises(JobTypeDoesNotExist):
        JobHandler.run_job(job.pk, job_type_name="retired")
    job = Job.objects.get(pk=job.pk)
    assert job.state == "failed"
    assert "has no job type 'retired'" in job.error
    assert get_store().read(job.pk)["state"] == "failed"


def test_a_stale_job_of_a_removed_type_is_failed_with_the_others(queueing, user, retired_type):
    retired = start_lost_job(user, "retired")
    retired_type()
    other = start_lost_job(user)
    assert JobHandler.sweep_stale_jobs() == 2
    assert (state_of(retired), state_of(other)) == ("failed", "failed")
    assert hook_calls(other, "on_error") == 1


def test_the_long_lived_sweeper_outlives_a_failing_sweep(queueing, monkeypatch, caplog):
    from task_ferry.management.commands import task_ferry_sweep

    outcomes = iter([RuntimeError("a bug in a hook"), 0])

    def sweep():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        raise KeyboardInterrupt  # the second round ran: the command's own way out

    monkeypatch.setattr(JobHandler, "sweep_stale_jobs", sweep)
    monkeypatch.setattr(task_ferry_sweep.time, "sleep", lambda seconds: None)
    call_command("task_ferry_sweep", interval=0.1)
    assert "Sweep failed, retrying in 0.1s: RuntimeError: a bug in a hook" in caplog.text
    assert next(outcomes, "all used") == "all used"


@pytest.mark.django_db(transaction=True)
def test_a_failed_round_of_the_long_lived_sweeper_is_logged_once(monkeypatch, capsys, caplog):
    """Logged with its traceback, so that error trackers hear of a sweeper failing round after
    round; not also written to stderr, which printed it twice on a console."""
    from task_ferry.management.commands import task_ferry_sweep

    def stop(seconds):
        raise KeyboardInterrupt  # the command's own way out, after the first round

    monkeypatch.setattr(task_ferry_sweep.time, "sleep", stop)
    # The heartbeat table is missing, as before migrate: the sweep's first query fails.
    table = Heartbeat._meta.db_table
    with connection.schema_editor() as editor:
        editor.alter_db_table(Heartbeat, table, f"{table}_away")
    try:
        call_command("task_ferry_sweep", interval=30)
    finally:
        with connection.schema_editor() as editor:
            editor.alter_db_table(Heartbeat, f"{table}_away", table)

    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].name == "task_ferry" and errors[0].exc_info is not None
    assert errors[0].getMessage().startswith("Sweep failed, retrying in 30s: ")
    assert table in errors[0].getMessage()
    assert "Sweep failed" not in capsys.readouterr().err


def test_command_sweeps_once(queueing, user, capsys):
    job = start_lost_job(user)
    call_command("task_ferry_sweep")
    assert "Failed 1 stale job(s)." in capsys.readouterr().out
    assert state_of(job) == "failed"


def test_command_rejects_a_bad_interval():
    with pytest.raises(CommandError, match="--interval must be"):
        call_command("task_ferry_sweep", interval=0)


@needs_row_locks
@pytest.mark.django_db(transaction=True)
def test_sweep_skips_a_row_locked_by_a_frozen_worker_instead_of_waiting(queueing, user):
    job = start_lost_job(user)
    locked, release = threading.Event(), threading.Event()

    def hold_row_lock():
        with transaction.atomic():
            Job.objects.select_for_update().get(pk=job.pk)
            locked.set()
            release.wait(10)
        connections.close_all()

    holder = threading.Thread(target=hold_row_lock)
    holder.start()
    try:
        locked.wait(5)
        began = time.monotonic()
        assert JobHandler.sweep_stale_jobs() == 0
        assert time.monotonic() - began < 1
        assert state_of(job) == "started"
    finally:
        release.set()
        holder.join()
    assert JobHandler.sweep_stale_jobs() == 1
    assert hook_calls(job, "on_error") == 1


@needs_row_locks
@pytest.mark.django_db(transaction=True)
def test_concurrent_sweeps_fail_each_job_once(queueing, user):
    jobs = [start_lost_job(None) for _ in range(12)]
    barrier = threading.Barrier(4)
    counts: list[int] = []

    def sweep():
        barrier.wait()
        counts.append(JobHandler.sweep_stale_jobs())
        connections.close_all()

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(counts) == 12
    assert all(state_of(j) == "failed" for j in jobs)
    assert all(hook_calls(j, "on_error") == 1 for j in jobs)


@pytest.fixture
def redis_store(ferry, redis_server):
    """The progress store is a redis-server of the test's own, which it can freeze."""
    ferry(REDIS_URL=redis_server.url, PROGRESS_STORE="task_ferry.stores.redis.RedisProgressStore")
    return redis_server


def record_store_calls(store, monkeypatch):
    """The names of the store's calls from now on, with whether each raised
    ``ProgressStoreUnavailable``; a call the store makes to itself is not counted again."""
    calls: list[tuple[str, bool]] = []
    depth = 0

    def recorded(name, method):
        def wrapper(*args, **kwargs):
            nonlocal depth
            depth += 1
            try:
                result = method(*args, **kwargs)
            except ProgressStoreUnavailable:
                if depth == 1:
                    calls.append((name, True))
                raise
            finally:
                depth -= 1
            if depth == 0:
                calls.append((name, False))
            return result

        return wrapper

    for name in ("read", "read_many", "write", "write_many", "write_if_absent", "delete"):
        monkeypatch.setattr(store, name, recorded(name, getattr(store, name)))
    return calls


@needs_row_locks
@pytest.mark.django_db(transaction=True)
def test_a_hanging_store_holds_no_job_row_lock_while_the_sweep_reads_it(
    queueing, redis_store, user, monkeypatch
):
    job = start_lost_job(user)
    store = get_store()
    reading = threading.Event()

    def noticed(read):
        def wrapper(*args, **kwargs):
            reading.set()
            return read(*args, **kwargs)

        return wrapper

    for name in ("read", "read_many"):
        monkeypatch.setattr(store, name, noticed(getattr(store, name)))
    probes: list[str] = []

    def lock_the_row_while_the_store_is_read():
        reading.wait(10)
        # Well within the store's socket timeout: the sweep still waits for Redis.
        time.sleep(0.3)
        try:
            with transaction.atomic():
                Job.objects.select_for_update(nowait=True).get(pk=job.pk)
            probes.append("free")
        except DatabaseError:
            probes.append("locked")
        finally:
            connections.close_all()

    prober = threading.Thread(target=lock_the_row_while_the_store_is_read)
    prober.start()
    try:
        with redis_store.frozen():
            assert JobHandler.sweep_stale_jobs() == 1
    finally:
        prober.join()
    assert probes == ["free"]
    assert state_of(job) == "failed"
    assert hook_calls(job, "on_error") == 1


def test_a_sweep_round_stops_calling_a_hanging_store_after_its_first_timeout(
    queueing, ferry, redis_store, user, monkeypatch, caplog
):
    ferry(PENDING_TIMEOUT=600)
    lost = [start_lost_job(user) for _ in range(3)]
    never_taken = [JobHandler.create_and_start(None, "scripted") for _ in range(2)]
    Job.objects.filter(pk__in=[job.pk for job in never_taken]).update(
        created_at=timezone.now() - datetime.timedelta(hours=1)
    )
    jobs = lost + never_taken
    for job in jobs:
        # Their live snapshots, as a worker's monitor and the create left them.
        publish(Job.objects.get(pk=job.pk))
    calls = record_store_calls(get_store(), monkeypatch)

    with redis_store.frozen():
        began = time.monotonic()
        assert JobHandler.sweep_stale_jobs() == 5
        took = time.monotonic() - began

    assert [state_of(job) for job in jobs] == ["failed"] * 5
    assert [hook_calls(job, "on_error") for job in jobs] == [1] * 5
    # Each call after the first would have waited a socket timeout of its own.
    assert [failed for _, failed in calls] == [True]
    assert took < 3 * SOCKET_TIMEOUT
    outage = [r for r in caplog.records if "unavailable" in r.getMessage().lower()]
    assert len(outage) == 1, [r.getMessage() for r in outage]

    # Back: the next round publishes the final snapshots the first could not.
    assert JobHandler.sweep_stale_jobs() == 0
    assert [get_store().read(job.pk)["state"] for job in jobs] == ["failed"] * 5
