"""What a Celery worker logs of the system checks at its start (``log_worker_checks``), with
task_ferry.W014; the real workers' test is in tests/workers/test_celery.py."""

import logging

import pytest

from task_ferry.executors.celery import log_worker_checks, worker_executor_warnings


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="task_ferry")


def executor(settings, path=None):
    ferry = {key: value for key, value in settings.TASK_FERRY.items() if key != "EXECUTOR"}
    settings.TASK_FERRY = ferry if path is None else {**ferry, "EXECUTOR": path}


def test_w014_where_the_executor_is_left_at_its_default(settings):
    executor(settings)
    (warning,) = worker_executor_warnings()
    assert warning.id == "task_ferry.W014"
    assert (
        "TASK_FERRY['EXECUTOR'] is 'task_ferry.executors.immediate.ImmediateExecutor' (the "
        "default), which runs each job inline" in warning.msg
    )
    assert "If the web processes run with these same settings" in warning.msg
    assert '"task_ferry.executors.celery.CeleryExecutor"' in warning.hint


def test_w014_names_an_immediate_executor_set_on_purpose_without_calling_it_the_default(settings):
    executor(settings, "task_ferry.executors.immediate.ImmediateExecutor")
    (warning,) = worker_executor_warnings()
    assert "(the default)" not in warning.msg


@pytest.mark.parametrize(
    "path",
    [
        "task_ferry.executors.celery.CeleryExecutor",
        # A deliberate choice, whose jobs run in db_worker: this worker is for other tasks.
        "task_ferry.executors.django_tasks.DjangoTasksExecutor",
        # E001's to report.
        "no.such.Executor",
    ],
)
def test_no_w014_for_an_executor_that_runs_jobs_elsewhere(settings, path):
    executor(settings, path)
    assert worker_executor_warnings() == []


def test_the_worker_logs_w014_unless_silenced(settings, caplog, db):
    executor(settings)
    log_worker_checks()
    assert [r.getMessage()[:32] for r in caplog.records] == ["System check (task_ferry.W014): "]
    caplog.clear()
    settings.SILENCED_SYSTEM_CHECKS = ["task_ferry.W014"]
    log_worker_checks()
    assert caplog.records == []


def test_celery_skip_checks_skips_them_as_it_skips_djangos(settings, caplog, monkeypatch):
    executor(settings)
    monkeypatch.setenv("CELERY_SKIP_CHECKS", "1")
    log_worker_checks()
    assert caplog.records == []
