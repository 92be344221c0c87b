"""task_ferry's system checks run and logged at a worker's start (``log_checks_at_start``),
where no ``check`` command shows them. A real Celery worker's: tests/workers/test_celery.py."""

import logging
import threading
from datetime import timedelta

import pytest
from django.core.checks import Critical, Error, Info
from django.core.checks import Warning as CheckWarning

from task_ferry import checks
from task_ferry.checks import log_check_messages, log_checks_at_start


def logged(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "task_ferry"]


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="task_ferry")


def test_each_message_is_logged_at_its_level_with_its_hint_errors_first(caplog):
    log_check_messages(
        [
            Info("Told.", id="app.I001"),
            CheckWarning("Watch out.", hint="Look first.", id="app.W001"),
            Error("Wrong.", hint="Fix it.", id="app.E001"),
            Critical("Broken.", id="app.E002"),
        ]
    )
    assert logged(caplog) == [
        ("ERROR", "System check (app.E002): Broken."),
        ("ERROR", "System check (app.E001): Wrong. HINT: Fix it."),
        ("WARNING", "System check (app.W001): Watch out. HINT: Look first."),
        ("INFO", "System check (app.I001): Told."),
    ]


def test_a_silenced_message_is_not_logged(settings, caplog):
    settings.SILENCED_SYSTEM_CHECKS = ["app.W001"]
    log_check_messages(
        [CheckWarning("Silenced.", id="app.W001"), CheckWarning("Shown.", id="app.W002")]
    )
    assert logged(caplog) == [("WARNING", "System check (app.W002): Shown.")]


def test_a_misspelt_key_is_logged_and_nothing_else(settings, caplog, db):
    """The checks themselves, the database ones included, under the test settings."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "REDIS_ULR": "redis://127.0.0.1:6379/0"}
    log_checks_at_start()
    [(level, text)] = logged(caplog)
    assert level == "ERROR"
    assert text.startswith(
        "System check (task_ferry.E002): TASK_FERRY has unknown key(s): 'REDIS_ULR' (did you "
        "mean 'REDIS_URL'?). HINT: Valid keys are: "
    )


def test_the_database_checks_run_too(settings, caplog, transactional_db):
    """W007 counts jobs: a plain ``check`` (and Celery's fixup) never runs it."""
    from tests.test_checks import started_job

    started_job(started_ago=timedelta(hours=2), beat_ago=timedelta(hours=2))
    log_checks_at_start()
    assert [text.split(":")[0] for _level, text in logged(caplog)] == [
        "System check (task_ferry.W007)"
    ]


def test_extra_messages_are_logged_with_the_checks(caplog, db):
    log_checks_at_start(lambda: [CheckWarning("Extra.", id="app.W001")])
    assert logged(caplog) == [("WARNING", "System check (app.W001): Extra.")]


def test_a_check_that_raises_is_logged_and_the_others_still_are(monkeypatch, caplog):
    def broken(**kwargs):
        raise ValueError("no way")

    def fine(**kwargs):
        return [CheckWarning("Found.", id="app.W001")]

    monkeypatch.setattr(checks, "own_checks", lambda: [broken, fine])
    log_checks_at_start()
    records = [r for r in caplog.records if r.name == "task_ferry"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("ERROR", "task_ferry's system check broken() failed"),
        ("WARNING", "System check (app.W001): Found."),
    ]
    assert "ValueError: no way" in caplog.text


def test_checks_that_do_not_end_hold_the_start_back_no_longer_than_the_timeout(monkeypatch, caplog):
    """A database or Redis that does not answer: the worker starts, and what the checks find
    is logged when they end."""
    release = threading.Event()

    def hanging(**kwargs):
        release.wait(10)
        return [CheckWarning("Late.", id="app.W001")]

    monkeypatch.setattr(checks, "own_checks", lambda: [hanging])
    log_checks_at_start(timeout=0.2)
    assert logged(caplog) == [
        (
            "WARNING",
            "task_ferry's system checks have not ended after 0.2 s (a database or progress "
            "store that does not answer?): starting without them; what they find is logged "
            "when they end.",
        )
    ]
    release.set()
    (thread,) = [t for t in threading.enumerate() if t.name == "task_ferry-checks"]
    thread.join(5)
    assert logged(caplog)[-1] == ("WARNING", "System check (app.W001): Late.")
