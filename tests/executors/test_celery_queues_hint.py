"""The Celery worker's start-up hint about the queues it consumes, with a stand-in consumer
(the real workers' test is tests/workers/test_celery.py)."""

import logging
from types import SimpleNamespace

import pytest

from task_ferry.executors.celery import (
    CLEANUP_OLD_JOBS_TASK,
    SWEEP_STALE_JOBS_TASK,
    app_argument,
    log_queues_served,
)


def consumer(*queues, beat=None):
    conf = SimpleNamespace(task_default_queue="celery", beat_schedule=beat or {})
    return SimpleNamespace(
        app=SimpleNamespace(main="proj", conf=conf),
        task_consumer=SimpleNamespace(queues=[SimpleNamespace(name=q) for q in queues]),
    )


def maintenance_on(queue):
    """Beat entries as ``beat_schedule(queue=queue)`` makes them (which needs Celery)."""
    return {
        task: {"task": task, "schedule": 60, "options": {"queue": queue}}
        for task in (CLEANUP_OLD_JOBS_TASK, SWEEP_STALE_JOBS_TASK)
    }


def hint(caplog):
    (record,) = [r for r in caplog.records if r.name == "task_ferry"]
    return record.levelno, record.getMessage()


@pytest.fixture
def celery_executor(settings):
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
        "CELERY_QUEUE": "default",
    }


def test_the_suggested_queues_keep_those_the_worker_consumes(celery_executor, caplog):
    """A worker started without -Q consumes ``celery``, where the project's own tasks go:
    started with only the jobs' queues, as the hint said, it would no longer run them."""
    caplog.set_level(logging.INFO, logger="task_ferry")
    log_queues_served(consumer("celery"))
    (record,) = [r for r in caplog.records if r.name == "task_ferry"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().endswith("celery -A proj worker -Q celery,default,special")


def test_a_worker_started_for_other_queues_is_told_it_takes_no_jobs_without_a_warning(
    celery_executor, caplog
):
    """``-Q emails``: a worker dedicated to the project's other tasks, on purpose."""
    caplog.set_level(logging.INFO, logger="task_ferry")
    log_queues_served(consumer("emails"))
    (record,) = [r for r in caplog.records if r.name == "task_ferry"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "This worker takes no jobs: it consumes the queue(s) emails, and task_ferry sends jobs "
        "to default, special."
    )


def test_the_suggested_queues_include_those_of_the_maintenance_tasks(celery_executor, caplog):
    """Beat entries on a queue of their own: without a worker for it, the stale-job sweep and
    the cleanup never run, and nothing else says so."""
    caplog.set_level(logging.INFO, logger="task_ferry")
    log_queues_served(consumer("celery", beat=maintenance_on("maintenance")))
    level, message = hint(caplog)
    assert level == logging.WARNING
    assert "task_ferry sends jobs to default, special and its maintenance tasks to maintenance" in (
        message
    )
    # On a worker of their own: behind the jobs, the sweep would run late.
    assert message.endswith(
        "celery -A proj worker -Q celery,default,special; and give maintenance a worker of its "
        "own: celery -A proj worker -Q maintenance --concurrency 1"
    )


def test_a_worker_for_every_job_queue_is_told_of_the_maintenance_queue(celery_executor, caplog):
    caplog.set_level(logging.INFO, logger="task_ferry")
    beat = {"mine": {"task": "proj.report"}, **maintenance_on("maintenance")}
    log_queues_served(consumer("default", "special", beat=beat))
    assert hint(caplog) == (
        logging.INFO,
        "This worker takes the tasks sent to the queue(s) default, special; those sent to "
        "maintenance need a worker started with -Q maintenance.",
    )


def test_maintenance_tasks_on_a_job_queue_need_no_word_of_their_own(celery_executor, caplog):
    caplog.set_level(logging.INFO, logger="task_ferry")
    log_queues_served(consumer("default", "special", beat=maintenance_on("default")))
    assert [r for r in caplog.records if r.name == "task_ferry"] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["celery", "-A", "proj.workers:app", "worker"],
        ["celery", "--app", "proj.workers:app", "worker"],
        ["celery", "--app=proj.workers:app", "worker"],
        ["celery", "-Aproj.workers:app", "worker"],
    ],
)
def test_the_suggested_command_names_the_app_as_the_worker_was_started(argv):
    """The app's name guessed the ``-A`` of a project whose app lives elsewhere than
    ``<name>/celery.py`` (the tests' own ``-A tests.celery_app`` was suggested as ``-A tests``,
    which Celery cannot load)."""
    assert app_argument(argv, default="proj") == "proj.workers:app"


def test_without_a_command_line_app_the_suggestion_names_the_apps_own_name():
    assert app_argument(["celery", "worker", "-Q", "celery"], default="proj") == "proj"
