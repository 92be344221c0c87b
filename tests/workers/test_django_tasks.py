"""DjangoTasksExecutor end to end: jobs dispatched by this process, run by a real
``db_worker`` process (django-tasks-db) on the PostgreSQL test database."""

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.utils import timezone

from task_ferry.executors import django_tasks
from task_ferry.handler import JobHandler, transition
from task_ferry.models import Job, JobState
from task_ferry.runner import INTERRUPTED_FAILURE
from task_ferry.stores.base import get_store
from tests import waiting
from tests.testapp.job_types import RoutedJobType
from tests.testapp.models import HookCall, Marker, ScriptedJob

DBTaskResult = pytest.importorskip("django_tasks_db.models").DBTaskResult

pytestmark = [
    pytest.mark.worker,
    pytest.mark.skipif(django_tasks.tasks_api is None, reason="no django.tasks"),
    pytest.mark.skipif(
        connection.vendor == "sqlite", reason="db_worker tests need concurrent writers"
    ),
    pytest.mark.skipif(
        not django_settings.TASK_FERRY.get("REDIS_URL"),
        reason="progress and cancel requests cross processes through Redis",
    ),
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENDED = ("finished", "failed", "cancelled")


class DbWorker:
    """A ``django-admin db_worker`` process on the test database, stopped by its PID."""

    def __init__(self, queues: str, log_path: Path, env: dict[str, str]) -> None:
        env = {
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
            ),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            # The worker must see what this test committed: the test database, not the main one.
            "TASK_FERRY_TEST_DB_NAME": connection.settings_dict["NAME"],
        }
        self.log_path = log_path
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "django",
                "db_worker",
                "--backend",
                django_settings.TASK_FERRY["TASKS_BACKEND"],
                "--queue-name",
                queues,
                "--interval",
                "0.05",
                "--no-startup-delay",
                "--no-reload",
            ],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


@pytest.fixture
def start_worker(transactional_db, tmp_path):
    """Starts db_worker processes; each is stopped (by PID) before the test database is flushed."""
    workers: list[DbWorker] = []

    def start(queues: str = "default", **env: str) -> DbWorker:
        worker = DbWorker(queues, tmp_path / f"db_worker-{len(workers)}.log", env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture(autouse=True)
def use_django_tasks(settings):
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.django_tasks.DjangoTasksExecutor",
    }


def wait_for(predicate, **kwargs):
    """``tests.waiting.wait_for`` with the longer timeout a db_worker needs."""
    return waiting.wait_for(predicate, **{"timeout": 30.0, "interval": 0.05, **kwargs})


def wait_until_ended(job, worker):
    return wait_for(
        lambda: ScriptedJob.objects.filter(pk=job.pk, state__in=ENDED).first(),
        what=f"job {job.pk} to end",
        worker=worker,
    )


def task_of(job):
    return DBTaskResult.objects.get(args_kwargs__args=[job.pk, job.type])


def task_done(task_filter, worker=None):
    """The task result once the worker is done with it: the job's ending hooks have run."""
    return wait_for(
        lambda: DBTaskResult.objects.filter(
            **task_filter, status__in=["SUCCESSFUL", "FAILED"]
        ).first(),
        what=f"task {task_filter} to be done",
        worker=worker,
    )


def hooks(job):
    return list(HookCall.objects.filter(job_id=job.pk).values_list("hook", flat=True))


def test_a_worker_with_a_misspelt_setting_does_not_start_and_says_why(start_worker):
    """db_worker is a management command: Django runs the system checks before it starts, as
    for runserver (a Celery worker runs none of its own; task_ferry logs them there)."""
    worker = start_worker(TASK_FERRY_TEST_MISSPELT_REDIS_URL="1")
    assert worker.process.wait(timeout=30) == 1
    output = worker.output()
    assert "(task_ferry.E002) TASK_FERRY has unknown key(s): 'REDIS_ULR' (did you mean " in output


def test_job_finishes_in_the_worker(start_worker, user):
    worker = start_worker()
    job = JobHandler.create_and_start(user, "scripted", steps=5, marker="kept")
    row = wait_until_ended(job, worker)
    assert row.state == "finished", worker.output()
    assert (row.result, row.progress_percentage, row.progress_state) == ("done", 100, "step 5 of 5")
    assert Marker.objects.filter(name="kept").exists()
    assert task_done({"args_kwargs__args": [job.pk, job.type]}, worker).status == "SUCCESSFUL"


def test_a_batch_of_jobs_finishes_in_the_worker(start_worker, user):
    worker = start_worker()
    jobs = JobHandler.create_and_start_many(
        user, "scripted", [{"steps": 2, "marker": f"batch {i}"} for i in range(3)]
    )
    for job in jobs:
        assert wait_until_ended(job, worker).state == "finished", worker.output()
    assert Marker.objects.filter(name__startswith="batch ").count() == 3


def test_failing_job_is_failed_once_and_rolled_back(start_worker, user):
    worker = start_worker()
    job = JobHandler.create_and_start(user, "scripted", steps=5, fail_at=2, marker="gone")
    row = wait_until_ended(job, worker)
    assert row.state == "failed"
    assert row.error == "RuntimeError: scripted failure at step 2"
    assert "Traceback" in row.traceback
    assert not Marker.objects.filter(name="gone").exists()
    # The task result records the failure too, for whoever watches django-tasks-db.
    task = task_done({"args_kwargs__args": [job.pk, job.type]}, worker)
    assert (task.status, task.exception_class_path) == ("FAILED", "builtins.RuntimeError")
    assert hooks(job) == ["on_error"]


def test_a_job_past_its_time_limit_is_stopped_and_failed(start_worker, user):
    worker = start_worker()
    # Ten seconds of ticks, for a type whose runs may take half a second.
    job = JobHandler.create_and_start(
        user, "time_limited", steps=1000, tick_delay=0.01, marker="gone"
    )
    row = wait_until_ended(job, worker)
    assert row.state == "failed"
    assert row.error == "JobTimeLimitExceeded: The job ran longer than its time limit of 0.5 s."
    assert 0 < row.progress_percentage < 100
    assert not Marker.objects.filter(name="gone").exists()
    # A failure like any other: whoever watches django-tasks-db sees the task fail too.
    task = task_done({"args_kwargs__args": [job.pk, job.type]}, worker)
    assert (task.status, task.exception_class_path) == (
        "FAILED",
        "task_ferry.exceptions.JobTimeLimitExceeded",
    )
    assert hooks(job) == ["on_error"]


def test_an_autocommit_run_commits_as_it_goes_and_keeps_its_writes_when_it_fails(
    start_worker, user
):
    worker = start_worker()
    job = JobHandler.create_and_start(
        user, "autocommit", steps=3, block_for=3, fail_at=1, marker="kept"
    )

    # Seen from here while the run still blocks: committed at once, not at the run's end.
    wait_for(lambda: Marker.objects.filter(name="kept").exists(), worker=worker)
    assert Job.objects.get(pk=job.pk).state == "started"
    row = wait_until_ended(job, worker)
    assert (row.state, row.error) == ("failed", "RuntimeError: scripted failure at step 1")
    assert Marker.objects.filter(name="kept").count() == 1
    assert hooks(job) == ["on_error"]


def test_running_job_is_cancelled_at_its_next_tick(start_worker, user):
    worker = start_worker()
    job = JobHandler.create_and_start(
        user, "scripted", steps=200, tick_delay=0.05, marker="cancelled-work"
    )
    wait_for(
        lambda: ScriptedJob.objects.filter(pk=job.pk, state="started").exists(),
        what="job to start",
        worker=worker,
    )
    JobHandler.cancel(user, job.pk)
    row = wait_until_ended(job, worker)
    assert row.state == "cancelled"
    assert row.progress_percentage < 100
    assert row.started_at is not None
    assert not Marker.objects.filter(name="cancelled-work").exists()
    assert task_done({"args_kwargs__args": [job.pk, job.type]}, worker).status == "SUCCESSFUL"
    assert hooks(job) == ["on_cancelled"]


def test_running_job_whose_row_is_deleted_stops_at_its_next_tick(start_worker, user):
    """Its owner's account deleted, say: the worker ran the job to its end, which found no row
    and rolled its work back, busy for nothing all that time."""
    worker = start_worker(TASK_FERRY_TEST_HEARTBEAT_INTERVAL="0.2")
    job = JobHandler.create_and_start(
        user, "scripted", steps=2000, tick_delay=0.05, marker="deleted-work"
    )
    wait_for(
        lambda: ScriptedJob.objects.filter(pk=job.pk, state="started").exists(),
        what="job to start",
        worker=worker,
    )
    Job.objects.filter(pk=job.pk).delete()
    deleted_at = time.monotonic()
    # Done with it in a beat and a tick, not in the 100 s its steps take.
    task = task_done({"args_kwargs__args": [job.pk, job.type]}, worker)
    assert time.monotonic() - deleted_at < 20
    assert task.status == "SUCCESSFUL"
    assert hooks(job) == ["on_cancelled"]
    assert not Marker.objects.filter(name="deleted-work").exists()
    assert "Traceback" not in worker.output()
    assert f"Job {job.pk}" not in worker.output()


def test_pending_job_cancelled_before_the_worker_takes_it_never_runs(start_worker, user):
    job = JobHandler.create_and_start(user, "scripted", steps=3, marker="never")
    assert task_of(job).status == "READY"
    JobHandler.cancel(user, job.pk)
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"

    worker = start_worker()
    # The worker takes the task and finds the job no longer pending.
    assert task_done({"args_kwargs__args": [job.pk, job.type]}, worker).status == "SUCCESSFUL"
    row = ScriptedJob.objects.get(pk=job.pk)
    assert (row.state, row.started_at, row.result) == ("cancelled", None, "")
    assert not Marker.objects.filter(name="never").exists()
    assert hooks(job) == ["on_cancelled"]


class RolledBack(Exception):
    pass


def test_a_pending_job_whose_cancel_was_rolled_back_runs_and_shows_as_it_does(
    start_worker, user, api
):
    # A view under ATOMIC_REQUESTS that failed after the cancel: the store said "cancelled"
    # and on_cancelled had run, while the worker went on to run the job.
    job = JobHandler.create_and_start(user, "scripted", steps=3, marker="ran")
    with pytest.raises(RolledBack), transaction.atomic():
        JobHandler.cancel(user, job.pk)
        raise RolledBack
    assert api.get(f"/api/jobs/{job.pk}/").json()["state"] == "pending"

    worker = start_worker()
    row = wait_until_ended(job, worker)
    assert row.state == "finished"
    assert Marker.objects.filter(name="ran").exists()
    # The worker publishes the end just after its row commits: the first poll's stored
    # "pending" gives way within moments.
    wait_for(
        lambda: api.get(f"/api/jobs/{job.pk}/").json()["state"] == "finished",
        timeout=5,
        what="the API to show the job finished",
        worker=worker,
    )
    assert hooks(job) == []


def test_progress_is_visible_through_the_api_while_the_job_runs(start_worker, user, api):
    worker = start_worker()
    job = JobHandler.create_and_start(user, "scripted", steps=25, tick_delay=0.08)
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = api.get(f"/api/jobs/{job.pk}/")
        assert response.status_code == 200
        body = response.json()
        seen.append((body["state"], body["progress_percentage"]))
        if body["state"] in ENDED:
            break
        time.sleep(0.1)
    assert seen[-1] == ("finished", 100), worker.output()
    midway = [pct for state, pct in seen if state == "started" and 0 < pct < 100]
    assert midway, f"no progress seen while running: {seen}"
    percentages = [pct for _, pct in seen]
    assert percentages == sorted(percentages)


def test_job_types_are_routed_to_their_queue(start_worker, user):
    special_worker = start_worker("special")
    plain = JobHandler.create_and_start(user, "scripted", steps=2)
    routed = JobHandler.create_and_start(user, "routed", steps=2)
    assert (task_of(plain).queue_name, task_of(routed).queue_name) == ("default", "special")

    assert wait_until_ended(routed, special_worker).state == "finished"
    # The special worker polled again and again since; the default-queue job is not its own.
    time.sleep(0.5)
    assert ScriptedJob.objects.get(pk=plain.pk).state == "pending"

    default_worker = start_worker("default")
    assert wait_until_ended(plain, default_worker).state == "finished"


def test_higher_priority_job_runs_first(start_worker, user, monkeypatch):
    monkeypatch.setattr(RoutedJobType, "priority", 50)
    first = JobHandler.create_and_start(user, "scripted", steps=1)
    urgent = JobHandler.create_and_start(user, "routed", steps=1)
    worker = start_worker("default,special")
    first_row, urgent_row = wait_until_ended(first, worker), wait_until_ended(urgent, worker)
    assert urgent_row.started_at < first_row.started_at


def test_rolled_back_create_dispatches_nothing(start_worker, user):
    worker = start_worker()
    with pytest.raises(RuntimeError, match="roll back"), transaction.atomic():
        JobHandler.create_and_start(user, "scripted", steps=1, marker="ghost")
        raise RuntimeError("roll back")
    # A later job runs, so the worker was there to take anything dispatched before it.
    later = JobHandler.create_and_start(user, "scripted", steps=1)
    assert wait_until_ended(later, worker).state == "finished"
    assert list(Job.objects.values_list("pk", flat=True)) == [later.pk]
    assert DBTaskResult.objects.count() == 1
    assert not Marker.objects.filter(name="ghost").exists()


def test_sweep_task_fails_a_job_whose_worker_vanished(start_worker, user, settings):
    job = JobHandler.create_and_start(user, "scripted", steps=1)
    # As if a worker took the job an hour ago and died: started, never a heartbeat.
    an_hour_ago = timezone.now() - datetime.timedelta(hours=1)
    assert transition(job, JobState.STARTED, from_states=[JobState.PENDING], started_at=an_hour_ago)
    alias = settings.TASK_FERRY["TASKS_BACKEND"]
    # What a cron entry does; only a worker on the maintenance queue runs, so the job's own
    # task (queue "default") stays untouched.
    django_tasks.sweep_stale_jobs.using(backend=alias, queue_name="maintenance").enqueue()
    worker = start_worker("maintenance")
    sweep = task_done({"queue_name": "maintenance"}, worker)
    assert (sweep.status, sweep.return_value) == ("SUCCESSFUL", 1)
    row = ScriptedJob.objects.get(pk=job.pk)
    assert row.state == "failed"
    assert "worker lost" in row.error
    assert hooks(job) == ["on_error"]


def test_a_worker_stopped_by_a_second_sigterm_fails_its_job_saying_so(start_worker, user):
    """The first SIGTERM lets the job finish; the second makes db_worker call sys.exit(1)
    under it. Its error once read "SystemExit: 1", which told an operator nothing."""
    worker = start_worker()
    job = JobHandler.create_and_start(
        user, "scripted", steps=400, tick_delay=0.05, marker="stopped-work"
    )
    # Progress shown: the job is inside its run(), past the runner's set-up.
    wait_for(
        lambda: (get_store().read(job.pk) or {}).get("progress_percentage", 0) > 0,
        what="job to make progress",
        worker=worker,
    )
    os.kill(worker.process.pid, signal.SIGTERM)
    wait_for(lambda: "shutting down gracefully" in worker.output(), what="the first SIGTERM")
    sent = 1

    def second_sigterm_taken():
        # db_worker's handler logs before it clears its running flag: a SIGTERM that lands
        # between is handled as a first one again. Send the next only once the last was
        # logged, and none after "terminating": the handler then restores SIGTERM's default.
        nonlocal sent
        output = worker.output()
        if "terminating current task" in output or worker.process.poll() is not None:
            return True
        if output.count("Received Terminated") == sent:
            os.kill(worker.process.pid, signal.SIGTERM)
            sent += 1
        return False

    wait_for(second_sigterm_taken, what="db_worker to terminate its task", worker=worker)
    # It records the task failed, then exits as after a graceful stop.
    worker.process.wait(timeout=30)
    row = ScriptedJob.objects.get(pk=job.pk)
    assert row.state == "failed", worker.output()
    assert row.error.startswith(
        "The process running this job exited while the job ran (SystemExit: 1): its worker was "
        "stopped before the job ended (db_worker is, at a second SIGTERM or Ctrl-C;"
    )
    assert row.human_readable_error == INTERRUPTED_FAILURE
    assert not Marker.objects.filter(name="stopped-work").exists()
    assert hooks(job) == ["on_error"]
    assert task_of(job).status == "FAILED"


def test_job_of_a_killed_worker_is_failed_by_the_sweep(start_worker, user, settings):
    worker = start_worker()
    job = JobHandler.create_and_start(
        user, "scripted", steps=200, tick_delay=0.05, marker="lost-work"
    )
    wait_for(
        lambda: ScriptedJob.objects.filter(pk=job.pk, state="started").exists(),
        what="job to start",
        worker=worker,
    )
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    # django-tasks-db does not retry: the task stays RUNNING and the job stays started.
    assert task_of(job).status == "RUNNING"
    assert ScriptedJob.objects.get(pk=job.pk).state == "started"

    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_TIMEOUT": 1}
    wait_for(lambda: JobHandler.sweep_stale_jobs() == 1, what="the sweep to fail the job")
    row = ScriptedJob.objects.get(pk=job.pk)
    assert row.state == "failed"
    assert "worker lost" in row.error
    assert not Marker.objects.filter(name="lost-work").exists()
    assert hooks(job) == ["on_error"]
