"""A job type's ``time_limit``: a run past it is stopped at its next tick and ends failed."""

import logging
import re
import time

import pytest

from task_ferry.exceptions import JobCancelled, JobTimeLimitExceeded
from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.registry import job_type_registry
from task_ferry.snapshot import job_snapshot
from task_ferry.stores.base import get_store
from task_ferry.sweep import fail_killed_at_time_limit
from tests.testapp.models import HookCall, Marker, ScriptedJob

TIME_LIMIT_TEXT = "The job ran longer than its time limit of 0.3 s."
TIME_LIMIT_ERROR = f"JobTimeLimitExceeded: {TIME_LIMIT_TEXT}"
TIME_LIMIT_MESSAGE = "This job took longer than it is allowed to and was stopped."


@pytest.fixture
def scripted_type(monkeypatch):
    """The scripted job type, given a time limit of 0.3 s for the test."""
    job_type_class = type(job_type_registry.get("scripted"))
    monkeypatch.setattr(job_type_class, "time_limit", 0.3)
    return job_type_class


def test_a_run_past_its_time_limit_is_stopped_at_a_tick_and_fails(
    transactional_db, user, scripted_type, caplog
):
    started = time.monotonic()
    # A failure like any other: with the ImmediateExecutor, its error reaches the caller.
    with (
        caplog.at_level(logging.WARNING, logger="task_ferry"),
        pytest.raises(JobTimeLimitExceeded, match=re.escape(TIME_LIMIT_TEXT)),
    ):
        # 1,000 ticks 10 ms apart: ten seconds without the limit.
        JobHandler.create_and_start(
            user, "scripted", steps=1000, tick_delay=0.01, marker="rolled-back"
        )
    assert time.monotonic() - started < 8
    job = row = ScriptedJob.objects.get()
    assert row.state == "failed"
    assert row.error == TIME_LIMIT_ERROR
    assert row.human_readable_error == TIME_LIMIT_MESSAGE
    assert "JobTimeLimitExceeded" in row.traceback and "increment" in row.traceback
    # Stopped part-way: how far it got and where stay.
    assert 0 < row.progress_percentage < 100
    assert row.progress_state.startswith("step ")
    assert row.finished_at is not None
    # Its work was rolled back, and its type cleans up as after any failure.
    assert not Marker.objects.exists()
    assert row.result == ""
    calls = HookCall.objects.filter(job_id=job.pk)
    assert [(c.hook, c.detail) for c in calls] == [("on_error", TIME_LIMIT_TEXT)]
    assert f"Job {job.pk} (scripted) ran longer than its time limit of 0.3 s" in caplog.text


def test_a_run_that_ticks_long_after_its_limit_is_reported_once(
    transactional_db, user, scripted_type, monkeypatch, caplog
):
    def run(self, job, progress):
        # A long stretch without ticks: the monitor checks the limit several times meanwhile.
        time.sleep(1.0)
        progress.increment(1)

    monkeypatch.setattr(scripted_type, "run", run)
    with (
        caplog.at_level(logging.WARNING, logger="task_ferry"),
        pytest.raises(JobTimeLimitExceeded),
    ):
        JobHandler.create_and_start(user, "scripted")
    assert ScriptedJob.objects.get().error == TIME_LIMIT_ERROR
    stops = [r for r in caplog.records if "stopping it at its next tick" in r.getMessage()]
    assert len(stops) == 1


def test_a_run_within_its_time_limit_finishes(transactional_db, user, scripted_type):
    job = JobHandler.create_and_start(user, "scripted", steps=5, tick_delay=0.01)
    assert (ScriptedJob.objects.get(pk=job.pk).state, job.state) == ("finished", "finished")
    assert not HookCall.objects.exists()


def test_a_run_that_catches_the_stop_and_returns_still_fails(
    transactional_db, user, scripted_type, monkeypatch
):
    # A loop that skips bad rows with ``except Exception`` catches the stop too.
    def run(self, job, progress):
        Marker.objects.create(name="rolled-back")
        for row in range(100):
            try:
                time.sleep(0.02)
                progress.increment(1, state=f"Row {row}")
            except Exception:
                continue

    monkeypatch.setattr(scripted_type, "run", run)
    with pytest.raises(JobTimeLimitExceeded):
        JobHandler.create_and_start(user, "scripted")
    row = ScriptedJob.objects.get()
    assert (row.state, row.error) == ("failed", TIME_LIMIT_ERROR)
    assert not Marker.objects.exists()
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_error"]


def test_a_run_that_wraps_the_stop_in_an_error_of_its_own_fails_for_its_time_limit(
    transactional_db, user, scripted_type, monkeypatch
):
    class ImportFailed(Exception):
        pass

    def run(self, job, progress):
        try:
            for _ in range(100):
                time.sleep(0.02)
                progress.increment(1)
        except JobCancelled as exc:
            raise ImportFailed("the import stopped") from exc

    monkeypatch.setattr(scripted_type, "run", run)
    with pytest.raises(JobTimeLimitExceeded) as raised:
        JobHandler.create_and_start(user, "scripted")
    assert isinstance(raised.value.__cause__, ImportFailed)
    row = ScriptedJob.objects.get()
    assert (row.state, row.error) == ("failed", TIME_LIMIT_ERROR)
    assert row.human_readable_error == TIME_LIMIT_MESSAGE
    # What the run raised on its way out is kept for operators.
    assert "ImportFailed: the import stopped" in row.traceback


def test_a_run_past_its_limit_that_the_process_exits_under_fails_for_its_time_limit(
    transactional_db, user, scripted_type, monkeypatch
):
    def run(self, job, progress):
        # Blocked past the limit without a tick, then stopped by a SIGTERM: Celery's pool
        # sends one at the hard time limit, and billiard's handler raises SystemExit.
        time.sleep(0.5)
        raise SystemExit(-241)

    monkeypatch.setattr(scripted_type, "run", run)
    # The exit goes on: the process must end.
    with pytest.raises(SystemExit):
        JobHandler.create_and_start(user, "scripted")
    row = ScriptedJob.objects.get()
    assert (row.state, row.error) == ("failed", TIME_LIMIT_ERROR)
    assert row.human_readable_error == TIME_LIMIT_MESSAGE
    assert "SystemExit: -241" in row.traceback
    calls = HookCall.objects.values_list("hook", "detail")
    assert list(calls) == [("on_error", TIME_LIMIT_TEXT)]


def test_a_run_killed_at_a_hard_time_limit_is_failed_from_outside_with_its_types_limit(
    transactional_db, user, scripted_type
):
    job = JobHandler.create_and_start(user, "scripted", steps=1)
    # As a killed run leaves its job: started, with progress published.
    Job.objects.filter(pk=job.pk).update(state="started", progress_percentage=0)
    job.refresh_from_db()
    get_store().write(job.pk, {**job_snapshot(job), "progress_percentage": 40})

    assert fail_killed_at_time_limit(job.pk, killed_after=61) is True
    row = ScriptedJob.objects.get()
    assert (row.state, row.error) == ("failed", TIME_LIMIT_ERROR)
    assert row.human_readable_error == TIME_LIMIT_MESSAGE
    assert row.progress_percentage == 40
    assert get_store().read(job.pk)["state"] == "failed"
    hooks = HookCall.objects.filter(hook="on_error").values_list("detail", flat=True)
    assert list(hooks) == [TIME_LIMIT_TEXT]
    # Once only: a second call, or one for a job that ended, changes nothing.
    assert fail_killed_at_time_limit(job.pk, killed_after=61) is False
    assert HookCall.objects.filter(hook="on_error").count() == 1


def test_a_run_of_a_type_without_a_limit_killed_at_a_hard_time_limit_names_that_limit(
    transactional_db, user
):
    # Celery's task_time_limit, for a type that has no time_limit of its own.
    job = JobHandler.create_and_start(user, "scripted", steps=1)
    Job.objects.filter(pk=job.pk).update(state="started")

    assert fail_killed_at_time_limit(job.pk, killed_after=300) is True
    row = ScriptedJob.objects.get()
    assert row.error == "JobTimeLimitExceeded: The job ran longer than its time limit of 300 s."
    assert row.human_readable_error == TIME_LIMIT_MESSAGE


def test_a_cancel_requested_before_the_time_limit_stays_a_cancel(
    transactional_db, user, scripted_type, monkeypatch
):
    def run(self, job, progress):
        JobHandler.cancel(user, job.pk)
        # Past the limit before the next tick.
        time.sleep(0.6)
        progress.increment(1)

    monkeypatch.setattr(scripted_type, "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_cancelled"]
