"""Job signals fire once per state change with the specific job; failures are logged with
%-style arguments and their traceback."""

import datetime
import logging
from collections import defaultdict

import pytest
from django.utils import timezone

from task_ferry import signals
from task_ferry.executors.immediate import ImmediateExecutor
from task_ferry.handler import JobHandler
from task_ferry.models import Job, JobState
from task_ferry.registry import job_type_registry
from tests.testapp.models import HookCall, ScriptedJob

ALL_SIGNALS = {
    "job_created": signals.job_created,
    "job_started": signals.job_started,
    "job_finished": signals.job_finished,
    "job_failed": signals.job_failed,
    "job_cancelled": signals.job_cancelled,
}


@pytest.fixture
def received():
    """Every signal sent during the test: name -> list of (sender, job, extra kwargs)."""
    calls = defaultdict(list)
    receivers = []
    for name, signal in ALL_SIGNALS.items():

        def receiver(sender, job, signal=None, _name=name, **kwargs):
            calls[_name].append((sender, job, kwargs))

        signal.connect(receiver, weak=False)
        receivers.append((signal, receiver))
    yield calls
    for signal, receiver in receivers:
        signal.disconnect(receiver)


def counts(calls):
    return {name: len(items) for name, items in calls.items() if items}


def test_successful_job_sends_created_started_finished_once(db, user, received):
    job = JobHandler.create_and_start(user, "scripted", steps=3)
    assert counts(received) == {"job_created": 1, "job_started": 1, "job_finished": 1}
    for name in ("job_created", "job_started", "job_finished"):
        ((sender, sent_job, extra),) = received[name]
        assert sender is ScriptedJob
        assert isinstance(sent_job, ScriptedJob)
        assert sent_job.pk == job.pk
        assert extra == {}
    (_, finished, _) = received["job_finished"][0]
    assert finished.state == JobState.FINISHED
    assert finished.result == "done"


def test_failed_job_sends_failed_once_with_the_exception(db, user, received):
    with pytest.raises(RuntimeError, match="scripted failure at step 1"):
        JobHandler.create_and_start(user, "scripted", steps=3, fail_at=1)
    assert counts(received) == {"job_created": 1, "job_started": 1, "job_failed": 1}
    ((sender, job, extra),) = received["job_failed"]
    assert sender is ScriptedJob
    assert job.state == JobState.FAILED
    assert isinstance(extra["exc"], RuntimeError)
    assert str(extra["exc"]) == "scripted failure at step 1"


def test_pending_job_cancelled_sends_cancelled_once(
    db, user, received, monkeypatch, django_capture_on_commit_callbacks
):
    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted")
    with django_capture_on_commit_callbacks(execute=True):
        JobHandler.cancel(user, job.pk)
        JobHandler.cancel(user, job.pk)  # a second cancel changes nothing
    assert counts(received) == {"job_created": 1, "job_cancelled": 1}
    ((sender, cancelled, _),) = received["job_cancelled"]
    assert sender is ScriptedJob
    assert cancelled.pk == job.pk
    assert cancelled.state == JobState.CANCELLED


def test_running_job_cancelled_sends_cancelled_once(db, user, received):
    def cancel_on_start(sender, job, **kwargs):
        JobHandler.cancel_job(job)

    signals.job_started.connect(cancel_on_start)
    try:
        job = JobHandler.create_and_start(user, "scripted", steps=500, tick_delay=0.01)
    finally:
        signals.job_started.disconnect(cancel_on_start)
    assert job.state == JobState.CANCELLED
    assert counts(received) == {"job_created": 1, "job_started": 1, "job_cancelled": 1}
    assert received["job_cancelled"][0][1].pk == job.pk


def test_swept_job_sends_failed_once(db, user, received, monkeypatch):
    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted")
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - datetime.timedelta(days=2))
    assert JobHandler.sweep_stale_jobs() == 1
    assert counts(received) == {"job_created": 1, "job_failed": 1}
    ((sender, failed, extra),) = received["job_failed"]
    assert sender is ScriptedJob
    assert failed.pk == job.pk
    assert "No worker picked up this job" in str(extra["exc"])


def test_a_raising_receiver_is_logged_and_the_job_still_finishes(db, user, caplog):
    def broken(sender, job, **kwargs):
        raise LookupError("receiver bug")

    signals.job_started.connect(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="task_ferry"):
            job = JobHandler.create_and_start(user, "scripted", steps=2)
    finally:
        signals.job_started.disconnect(broken)
    assert job.state == JobState.FINISHED
    (record,) = [r for r in caplog.records if "receiver" in r.msg]
    assert record.msg == "Job %s: receiver %r of a job signal raised"
    assert record.args[0] == job.pk
    assert isinstance(record.exc_info[1], LookupError)


def test_job_failure_is_logged_with_args_and_traceback(db, user, caplog):
    with caplog.at_level(logging.ERROR, logger="task_ferry"), pytest.raises(RuntimeError):
        JobHandler.create_and_start(user, "scripted", steps=2, fail_at=0)
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "%s" in record.msg  # formatted by logging, so trackers group by message
    assert record.args[0] == Job.objects.get().pk
    assert isinstance(record.exc_info[1], RuntimeError)
    assert record.exc_info[2] is not None


@pytest.fixture
def raising_hooks(monkeypatch):
    job_type = type(job_type_registry.get("scripted"))

    def fail(self, job, *args):
        HookCall.objects.create(job_id=job.pk, hook="raised")
        raise ValueError("hook bug")

    for hook in ("on_error", "on_cancelled", "before_delete"):
        monkeypatch.setattr(job_type, hook, fail)


def hook_error_records(caplog, hook):
    return [r for r in caplog.records if f"{hook} hook" in r.msg]


def assert_logged_exception(records):
    (record,) = records
    assert record.levelno == logging.ERROR
    assert record.funcName  # logged from task_ferry's own code
    assert isinstance(record.exc_info[1], ValueError)
    assert "%s" in record.msg and record.args


def test_raising_on_error_hook_is_logged(db, user, caplog, raising_hooks, received):
    with caplog.at_level(logging.ERROR, logger="task_ferry"), pytest.raises(RuntimeError):
        JobHandler.create_and_start(user, "scripted", steps=2, fail_at=0)
    assert_logged_exception(hook_error_records(caplog, "on_error"))
    assert Job.objects.get().state == JobState.FAILED
    assert counts(received)["job_failed"] == 1


def test_raising_on_cancelled_hook_is_logged(
    db, user, caplog, raising_hooks, received, monkeypatch, django_capture_on_commit_callbacks
):
    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted")
    with (
        caplog.at_level(logging.ERROR, logger="task_ferry"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        JobHandler.cancel(user, job.pk)
    assert_logged_exception(hook_error_records(caplog, "on_cancelled"))
    assert job.state == JobState.CANCELLED
    assert counts(received)["job_cancelled"] == 1


def test_raising_before_delete_hook_is_logged_and_the_job_deleted(db, user, caplog, raising_hooks):
    job = JobHandler.create_and_start(user, "scripted", steps=1)
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - datetime.timedelta(days=30))
    with caplog.at_level(logging.ERROR, logger="task_ferry"):
        assert JobHandler.cleanup_old_jobs() == 1
    assert_logged_exception(hook_error_records(caplog, "before_delete"))
    assert not Job.objects.exists()


def test_job_created_is_sent_inside_the_creating_transaction_like_post_save(
    transactional_db, user, no_dispatch
):
    """As the signals docs say: the row exists for the receiver, and a receiver that defers its
    outside work with on_commit sends nothing for a create that is rolled back."""
    from django.db import transaction

    seen, sent = [], []

    def receiver(sender, job, **kwargs):
        seen.append(Job.objects.filter(pk=job.pk).exists())
        transaction.on_commit(lambda: sent.append(job.pk))

    signals.job_created.connect(receiver, weak=False)
    try:
        with (
            pytest.raises(RuntimeError, match="the caller's own error"),
            transaction.atomic(),
        ):
            JobHandler.create_and_start(user, "scripted")
            raise RuntimeError("the caller's own error")
        kept = JobHandler.create_and_start(user, "scripted")
    finally:
        signals.job_created.disconnect(receiver)
    assert seen == [True, True]
    assert sent == [kept.pk]
    assert list(Job.objects.values_list("pk", flat=True)) == [kept.pk]
