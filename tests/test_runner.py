import logging
import os
import threading
from contextlib import contextmanager

import pytest
from django.db import connection
from django.utils.translation import gettext_lazy, override

from task_ferry import runner, signals
from task_ferry.handler import JobHandler, transition
from task_ferry.models import Job, JobState
from task_ferry.monitor import get_monitor
from task_ferry.registry import job_type_registry
from task_ferry.snapshot import ERROR_TEXT_MAX_LENGTH
from task_ferry.stores.base import get_store
from tests.testapp.models import HookCall, Marker, ScriptedJob


def test_finished_job_commits_its_work_and_reaches_100(db, user):
    job = JobHandler.create_and_start(user, "scripted", steps=5, marker="kept")
    row = ScriptedJob.objects.get(pk=job.pk)
    assert row.state == "finished"
    assert row.progress_percentage == 100
    assert row.progress_state == "step 5 of 5"
    assert row.result == "done"
    assert row.started_at <= row.finished_at
    assert Marker.objects.filter(name="kept").exists()
    # The caller's handle followed the run.
    assert job.state == "finished"


# Defined at import, as a project's labels are; a message of Django's own catalogue.
REQUIRED = gettext_lazy("This field is required.")


def test_a_lazy_label_is_stored_and_published_in_the_language_the_run_ticked_in(
    transactional_db, user, monkeypatch
):
    def run(self, job, progress):
        # As a job for a user who reads German would: the monitor's thread has its own language.
        with override("de"):
            progress.increment(60, state=REQUIRED)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    assert job.state == "finished"
    row = Job.objects.get(pk=job.pk)
    assert row.progress_state == "Dieses Feld ist zwingend erforderlich."
    snapshot = get_store().read(job.pk)
    assert snapshot is not None
    assert (snapshot["state"], snapshot["progress_state"]) == (
        "finished",
        "Dieses Feld ist zwingend erforderlich.",
    )


def test_failing_job_is_marked_failed_and_the_error_reaches_the_caller(transactional_db, user):
    with pytest.raises(RuntimeError, match="scripted failure at step 3"):
        JobHandler.create_and_start(user, "scripted", steps=10, fail_at=3, marker="rolled-back")
    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    assert job.error == "RuntimeError: scripted failure at step 3"
    assert job.human_readable_error == "Something went wrong while running this job."
    assert "Traceback" in job.traceback and "scripted failure" in job.traceback
    assert "Traceback" not in job.error
    assert job.progress_percentage == 30
    assert job.finished_at is not None
    # The job's own writes were rolled back; its failed state was not.
    assert not Marker.objects.exists()
    assert job.result == ""
    calls = HookCall.objects.filter(job_id=job.pk)
    assert [(c.hook, c.detail) for c in calls] == [("on_error", "scripted failure at step 3")]


def test_exception_can_carry_a_message_for_users(db, user, monkeypatch):
    class Unreadable(Exception):
        human_readable_error = "The file could not be read. Upload it again."

    def run(self, job, progress):
        raise Unreadable("EOF in /srv/uploads/17.csv")

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    with pytest.raises(Unreadable):
        JobHandler.create_and_start(user, "scripted")
    job = Job.objects.get()
    assert job.human_readable_error == "The file could not be read. Upload it again."


def test_a_message_for_users_too_large_for_one_statement_is_cut_and_still_fails_the_job(
    transactional_db, user, monkeypatch, client
):
    # A message quoting what the job read: over MariaDB's max_allowed_packet, the job's end
    # would be refused and leave it started; elsewhere users would get all of it.
    class Unreadable(Exception):
        human_readable_error = "Row 7 could not be read: " + "x" * 20_000_000 + " (end)"

    def run(self, job, progress):
        raise Unreadable("bad row")

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    with pytest.raises(Unreadable):
        JobHandler.create_and_start(user, "scripted")
    job = Job.objects.get()
    assert job.state == "failed"
    assert job.human_readable_error.startswith("Row 7 could not be read: xxx")
    assert job.human_readable_error.endswith("…")
    assert len(job.human_readable_error) == ERROR_TEXT_MAX_LENGTH
    assert get_store().read(job.pk)["human_readable_error"] == job.human_readable_error
    client.force_login(user)
    body = client.get(f"/api/jobs/{job.pk}/").json()
    assert (body["state"], body["human_readable_error"]) == ("failed", job.human_readable_error)


@pytest.mark.parametrize(
    ("message", "stored"),
    [
        ("Row 7 of a\x00b.csv is empty.", "Row 7 of a\ufffdb.csv is empty."),
        (os.fsdecode(b"caf\xe9.csv is empty."), "caf\ufffd.csv is empty."),
        # Translated lazily, or any object: shown as its text.
        (gettext_lazy("Upload it again."), "Upload it again."),
        ("   ", "Something went wrong while running this job."),
    ],
    ids=["nul", "not-utf8", "lazy", "blank"],
)
def test_a_message_for_users_is_stored_as_every_database_takes_it(
    transactional_db, user, monkeypatch, message, stored
):
    class Unreadable(Exception):
        human_readable_error = message

    def run(self, job, progress):
        raise Unreadable("bad row")

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    with pytest.raises(Unreadable):
        JobHandler.create_and_start(user, "scripted")
    job = Job.objects.get()
    assert (job.state, job.human_readable_error) == ("failed", stored)


def test_a_message_for_users_that_raises_when_read_gives_the_generic_one(
    transactional_db, user, monkeypatch
):
    class Unreadable(Exception):
        @property
        def human_readable_error(self):
            return self.args[1]  # IndexError: raised with one argument only

    def run(self, job, progress):
        raise Unreadable("bad row")

    errors = []
    job_type = type(job_type_registry.get("scripted"))
    monkeypatch.setattr(job_type, "run", run)
    monkeypatch.setattr(job_type, "on_error", lambda self, job, exc: errors.append(exc))
    with pytest.raises(Unreadable):
        JobHandler.create_and_start(user, "scripted")
    job = Job.objects.get()
    assert job.state == "failed"
    assert job.human_readable_error == "Something went wrong while running this job."
    assert job.error == "Unreadable: bad row"
    assert [type(e) for e in errors] == [Unreadable]


def run_reading(user, monkeypatch, name, *, where):
    """Run a scripted job that writes a Marker, labels itself "Reading <name>" and, where
    ``where`` is "error", fails on that file; the job as stored, and what on_error got."""

    def run(self, job, progress):
        Marker.objects.create(name="written")
        progress.increment(10, state=f"Reading {name}")
        if where == "error":
            raise ValueError(f"bad record in {name}")

    errors = []
    job_type = type(job_type_registry.get("scripted"))
    monkeypatch.setattr(job_type, "run", run)
    monkeypatch.setattr(job_type, "on_error", lambda self, job, exc: errors.append(exc))
    if where == "error":
        with pytest.raises(ValueError, match="bad record"):
            JobHandler.create_and_start(user, "scripted")
    else:
        JobHandler.create_and_start(user, "scripted")
    return ScriptedJob.objects.get(), errors


@pytest.mark.parametrize("where", ["error", "label"])
@pytest.mark.parametrize(
    ("name", "stored"),
    [
        # PostgreSQL refuses NUL in text: the job's own end would raise and leave it started.
        ("a\x00b.csv", "a\ufffdb.csv"),
        # os.listdir() gives a name that is not UTF-8 with lone surrogates, which no database
        # driver encodes.
        (os.fsdecode(b"caf\xe9.csv"), "caf\ufffd.csv"),
    ],
    ids=["nul", "not-utf8"],
)
def test_text_no_database_stores_in_an_error_or_a_label_still_ends_the_job(
    transactional_db, user, monkeypatch, where, name, stored
):
    job, errors = run_reading(user, monkeypatch, name, where=where)
    assert job.state == ("failed" if where == "error" else "finished")
    assert job.progress_state == f"Reading {stored}"
    assert get_store().read(job.pk)["progress_state"] == f"Reading {stored}"
    if where == "error":
        assert job.error == f"ValueError: bad record in {stored}"
        assert stored in job.traceback
        # The hook gets the exception as it was raised.
        assert [str(e) for e in errors] == [f"bad record in {name}"]


@contextmanager
def job_table_in(charset):
    """The job table converted to MySQL's ``charset`` for the block, then back."""
    table = Job._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT table_collation FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = %s",
            [table],
        )
        (collation,) = cursor.fetchone()
        cursor.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET {charset}")
    yield
    with connection.cursor() as cursor:
        cursor.execute(
            f"ALTER TABLE {table} CONVERT TO CHARACTER SET {collation.split('_')[0]} "
            f"COLLATE {collation}"
        )


@pytest.fixture
def utf8mb3_job_table(transactional_db):
    """The job table in MySQL's 3-byte utf8, as in databases created before utf8mb4 was the
    default: it refuses characters beyond the Basic Multilingual Plane, emoji among them."""
    with job_table_in("utf8mb3"):
        yield


@pytest.fixture
def latin1_job_table(transactional_db):
    """The job table in MySQL's latin1 (Windows-1252), the default of old servers and
    databases: it refuses Chinese, Cyrillic, arrows and emoji."""
    with job_table_in("latin1"):
        yield


@pytest.mark.skipif(connection.vendor != "mysql", reason="MySQL's utf8mb3 tables")
@pytest.mark.parametrize("where", ["error", "label"])
def test_an_emoji_a_utf8mb3_table_refuses_still_ends_the_job(
    utf8mb3_job_table, user, monkeypatch, where
):
    job, errors = run_reading(user, monkeypatch, "\U0001f600.csv", where=where)
    assert job.state == ("failed" if where == "error" else "finished")
    assert job.progress_state == "Reading \ufffd.csv"
    assert get_store().read(job.pk)["progress_state"] == "Reading \ufffd.csv"
    if where == "error":
        assert job.error == "ValueError: bad record in \ufffd.csv"
        assert "\ufffd.csv" in job.traceback
        assert [str(e) for e in errors] == ["bad record in \U0001f600.csv"]
    else:
        # The run's own work committed with its finish.
        assert Marker.objects.filter(name="written").exists()


@pytest.mark.skipif(connection.vendor != "mysql", reason="MySQL's latin1 tables")
@pytest.mark.parametrize("where", ["error", "label"])
def test_text_a_latin1_table_refuses_still_ends_the_job(latin1_job_table, user, monkeypatch, where):
    # Windows-1252 holds "€" and "ï"; "?" stands for each character it lacks.
    name, stored = "€ naïve → 报告 Отчёт \U0001f600.csv", "€ naïve ? ?? ????? ?.csv"
    job, errors = run_reading(user, monkeypatch, name, where=where)
    assert job.state == ("failed" if where == "error" else "finished")
    assert job.progress_state == f"Reading {stored}"
    snapshot = get_store().read(job.pk)
    assert (snapshot["state"], snapshot["progress_state"]) == (job.state, job.progress_state)
    if where == "error":
        assert job.error == f"ValueError: bad record in {stored}"
        assert snapshot["error"] == job.error
        assert stored in job.traceback
        assert [str(e) for e in errors] == [f"bad record in {name}"]
    else:
        assert Marker.objects.filter(name="written").exists()


def test_an_error_message_too_large_for_one_statement_still_fails_the_job(
    transactional_db, user, monkeypatch
):
    # MariaDB refuses a statement over max_allowed_packet (16 MiB by default) and drops the
    # connection: an exception quoting a whole file would leave its job started.
    def run(self, job, progress):
        progress.increment(10, state="Parsing")
        raise ValueError("bad payload: " + "x" * 20_000_000 + " (end)")

    errors = []
    job_type = type(job_type_registry.get("scripted"))
    monkeypatch.setattr(job_type, "run", run)
    # The test type's own hook stores the message whole.
    monkeypatch.setattr(job_type, "on_error", lambda self, job, exc: errors.append(exc))
    with pytest.raises(ValueError, match="bad payload"):
        JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert (job.state, job.progress_percentage) == ("failed", 10)
    assert job.error.startswith("ValueError: bad payload: xxx")
    assert job.traceback.startswith("Traceback (most recent call last):")
    assert job.traceback.rstrip().endswith("x (end)")
    assert "characters left out" in job.traceback
    assert len(job.traceback) < 200_000
    assert [len(str(e)) for e in errors] == [20_000_019]


def test_an_exception_whose_str_raises_still_fails_the_job(transactional_db, user, monkeypatch):
    class Unprintable(Exception):
        def __str__(self):
            raise AttributeError("'NoneType' object has no attribute 'name'")

    def run(self, job, progress):
        raise Unprintable()

    errors = []
    job_type = type(job_type_registry.get("scripted"))
    monkeypatch.setattr(job_type, "run", run)
    monkeypatch.setattr(job_type, "on_error", lambda self, job, exc: errors.append(exc))
    # The job's own exception reaches the caller, not the one its message raised.
    with pytest.raises(Unprintable):
        JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    assert job.error == "Unprintable: <exception str() failed>"
    assert "Unprintable" in job.traceback
    assert [type(e) for e in errors] == [Unprintable]


@pytest.mark.parametrize(
    ("interruption", "what_stopped_it"),
    [
        (KeyboardInterrupt(), "was interrupted while the job ran (KeyboardInterrupt): Ctrl-C"),
        # db_worker's second SIGTERM or Ctrl-C: sys.exit(1) in its signal handler.
        (SystemExit(1), "exited while the job ran (SystemExit: 1): its worker was stopped"),
    ],
)
def test_an_interrupted_job_is_marked_failed_not_left_started(
    transactional_db, user, monkeypatch, interruption, what_stopped_it
):
    # Ctrl-C in a management command running jobs inline, or sys.exit() in the job's code.
    def run(self, job, progress):
        Marker.objects.create(name="rolled-back")
        progress.increment(40, state="Halfway there")
        raise interruption

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    with pytest.raises(type(interruption)):
        JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    # "SystemExit: 1" alone told an operator neither what happened nor what to do.
    assert job.error.startswith(f"The process running this job {what_stopped_it}")
    assert job.error.endswith("Start the job again.")
    assert (
        job.human_readable_error
        == "This job was interrupted before it could finish. Start it again."
    )
    assert (job.progress_percentage, job.progress_state) == (40, "Halfway there")
    assert not Marker.objects.exists()
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_error"]
    assert get_store().read(job.pk)["state"] == "failed"


def test_an_interruption_in_a_job_started_receiver_fails_the_job_and_stops_its_watch(
    transactional_db, user
):
    # send_robust() catches a receiver's exceptions, not KeyboardInterrupt or SystemExit.
    def interrupted(sender, job, **kwargs):
        raise KeyboardInterrupt

    signals.job_started.connect(interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            JobHandler.create_and_start(user, "scripted")
    finally:
        signals.job_started.disconnect(interrupted)
    job = ScriptedJob.objects.get()
    # Left started, its monitor would have beaten for it with nothing running it.
    assert job.state == "failed"
    assert (
        job.human_readable_error
        == "This job was interrupted before it could finish. Start it again."
    )
    assert get_monitor()._watching() == []


@contextmanager
def failures_sent():
    """The ``(job id, exc)`` of each ``job_failed`` sent inside the block."""
    sent = []

    def receiver(sender, job, exc, **kwargs):
        sent.append((job.pk, exc))

    signals.job_failed.connect(receiver)
    try:
        yield sent
    finally:
        signals.job_failed.disconnect(receiver)


@pytest.mark.parametrize(
    ("fault", "error", "message"),
    [
        # A worker at its limit of threads (ulimit -u, a container's pids.max).
        (
            RuntimeError("can't start new thread"),
            "RuntimeError: can't start new thread",
            "Something went wrong while running this job.",
        ),
        # Ctrl-C while start() waits for the thread to come up.
        (
            KeyboardInterrupt(),
            "The process running this job was interrupted while the job ran (KeyboardInterrupt)",
            "This job was interrupted before it could finish. Start it again.",
        ),
    ],
)
def test_a_monitor_thread_that_cannot_start_fails_the_job_at_once(
    transactional_db, user, monkeypatch, fault, error, message
):
    # Not a fault to cause for real as root: the monitor's thread start raises, as in a
    # worker's first job, or its first after the thread died.
    def start(self):
        raise fault

    monkeypatch.setattr(get_monitor(), "_thread", None)
    monkeypatch.setattr(threading.Thread, "start", start)
    with failures_sent() as sent, pytest.raises(type(fault)) as raised:
        JobHandler.create_and_start(user, "scripted", marker="never-written")
    assert raised.value is fault
    job = ScriptedJob.objects.get()
    # Left started, it waited HEARTBEAT_TIMEOUT for the sweep with nothing running it.
    assert job.state == "failed"
    assert job.error.startswith(error)
    assert job.human_readable_error == message
    assert type(fault).__name__ in job.traceback
    assert job.finished_at is not None
    assert get_store().read(job.pk)["state"] == "failed"
    assert sent == [(job.pk, fault)]
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_error"]
    assert not Marker.objects.exists()
    # Nor is it watched: the monitor would beat for it when its thread next starts.
    assert get_monitor()._watching() == []


def test_a_stop_while_a_run_is_set_up_fails_the_job_at_once(transactional_db, user, monkeypatch):
    # db_worker's second SIGTERM, before the monitor watches the job.
    def own_values(job):
        raise SystemExit(1)

    monkeypatch.setattr(runner, "own_values", own_values)
    with failures_sent() as sent, pytest.raises(SystemExit):
        JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    assert job.error.startswith("The process running this job exited while the job ran")
    assert (
        job.human_readable_error
        == "This job was interrupted before it could finish. Start it again."
    )
    assert [pk for pk, _exc in sent] == [job.pk]
    assert get_monitor()._watching() == []


def test_a_run_that_catches_its_cancel_and_returns_still_ends_cancelled(
    transactional_db, user, monkeypatch
):
    # A loop that skips bad rows with ``except Exception`` catches JobCancelled too.
    def run(self, job, progress):
        Marker.objects.create(name="rolled-back")
        for row in range(10):
            try:
                if row == 3:
                    JobHandler.cancel(user, job.pk)
                progress.increment(10, state=f"Row {row}")
            except Exception:
                continue

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert (job.state, job.progress_percentage, job.progress_state) == ("cancelled", 30, "")
    assert not Marker.objects.exists()
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_cancelled"]


@pytest.mark.parametrize("kind", ["coroutine", "generator"])
def test_a_run_whose_body_never_runs_fails_instead_of_finishing(db, user, monkeypatch, kind):
    # An async def, or a generator, behind a decorator: registration sees a plain function.
    async def export(job, progress):
        Marker.objects.create(name="exported")

    def export_rows(job, progress):
        Marker.objects.create(name="exported")
        yield

    body = export if kind == "coroutine" else export_rows

    def run(self, job, progress):
        return body(job, progress)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    # It was marked finished, at 100 %, with nothing done.
    with pytest.raises(TypeError, match=f"ScriptedJobType.run returned {kind} "):
        JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    assert job.error.startswith(f"TypeError: ScriptedJobType.run returned {kind} ")
    assert "Make it a plain `def`" in job.error
    assert not Marker.objects.exists()
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_error"]


def test_a_run_that_wraps_its_cancel_in_an_error_of_its_own_ends_cancelled(
    transactional_db, user, monkeypatch
):
    class ImportFailed(Exception):
        pass

    def run(self, job, progress):
        Marker.objects.create(name="rolled-back")
        try:
            JobHandler.cancel(user, job.pk)
            progress.increment(10, state="Row 1")
        except Exception as exc:
            raise ImportFailed("the import stopped") from exc

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    assert ScriptedJob.objects.get().state == "cancelled"
    assert job.state == "cancelled"
    assert not Marker.objects.exists()
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_cancelled"]


@pytest.mark.parametrize("end", ["cancelled", "failed"])
def test_a_cancelled_job_keeps_how_far_it_got_without_its_last_label_a_failed_one_keeps_both(
    db, user, api, monkeypatch, end
):
    def run(self, job, progress):
        for step in range(10):
            if step == 3:
                if end == "cancelled":
                    progress.request_cancel()
                else:
                    raise RuntimeError("row 3 is broken")
            progress.increment(10, state=f"step {step + 1} of 10")

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    if end == "failed":
        with pytest.raises(RuntimeError):
            JobHandler.create_and_start(user, "scripted")
    else:
        JobHandler.create_and_start(user, "scripted")
    # A label beside "cancelled" would read as work still going on; beside "failed" it says
    # where the job failed.
    label = "" if end == "cancelled" else "step 3 of 10"
    row = ScriptedJob.objects.get()
    assert (row.state, row.progress_percentage, row.progress_state) == (end, 30, label)
    snapshot = get_store().read(row.pk)
    assert (snapshot["progress_percentage"], snapshot["progress_state"]) == (30, label)
    body = api.get(f"/api/jobs/{row.pk}/").json()
    assert (body["state"], body["progress_percentage"], body["progress_state"]) == (end, 30, label)


def test_a_cancel_request_after_the_last_tick_lets_the_job_finish(
    transactional_db, user, monkeypatch
):
    def run(self, job, progress):
        progress.increment(100)
        JobHandler.cancel(user, job.pk)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    JobHandler.create_and_start(user, "scripted")
    assert ScriptedJob.objects.get().state == "finished"


def fail_elsewhere(job_id):
    """The stale-job sweep failing a job that is still running, from its own thread and
    database connection; returns once it has."""

    def sweep():
        transition(Job(pk=job_id), JobState.FAILED, from_states=[JobState.STARTED], error="lost")
        connection.close()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    sweeper.join()


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite allows one writer at a time")
def test_a_job_ended_elsewhere_while_running_keeps_that_end_and_loses_its_work(
    transactional_db, user, monkeypatch
):
    # A zombie: the sweep, on its own connection, failed the job while its run was still going.
    original = type(job_type_registry.get("scripted")).run

    def run(self, job, progress):
        original(self, job, progress)
        fail_elsewhere(job.pk)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    job = JobHandler.create_and_start(user, "scripted", marker="zombie")
    row = ScriptedJob.objects.get(pk=job.pk)
    assert (row.state, row.error, row.result) == ("failed", "lost", "")
    assert not Marker.objects.exists()
    assert not HookCall.objects.exists()
    # Whatever its monitor published meanwhile, the store ends with the sweep's end.
    assert get_store().read(job.pk)["state"] == "failed"


@pytest.mark.parametrize("end", ["failed", "cancelled"])
def test_an_ended_jobs_snapshot_shows_its_row_not_the_writes_rolled_back(
    transactional_db, user, api, monkeypatch, end
):
    seen_by_hook = []

    def run(self, job, progress):
        job.result = "written, then rolled back"
        job.save(update_fields=["result"])
        if end == "cancelled":
            progress.request_cancel()
            progress.increment()
        raise RuntimeError("boom")

    job_type = type(job_type_registry.get("scripted"))
    monkeypatch.setattr(job_type, "run", run)
    monkeypatch.setattr(job_type, "on_cancelled", lambda self, job: seen_by_hook.append(job.result))
    if end == "failed":
        with pytest.raises(RuntimeError):
            JobHandler.create_and_start(user, "scripted")
    else:
        JobHandler.create_and_start(user, "scripted")
    row = ScriptedJob.objects.get()
    assert (row.state, row.result) == (end, "")
    assert get_store().read(row.pk)["fields"]["result"] == ""
    body = api.get(f"/api/jobs/{row.pk}/").json()
    assert (body["state"], body["result"]) == (end, "")
    if end == "cancelled":
        # The hook still sees what the run did, to clean up after it.
        assert seen_by_hook == ["written, then rolled back"]


def test_a_job_runs_at_most_once(db, user, monkeypatch):
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted", marker="once")
    assert JobHandler.run_job(job.pk) is not None
    assert JobHandler.run_job(job.pk) is None  # a redelivery finds it no longer pending
    assert Marker.objects.filter(name="once").count() == 1


@pytest.mark.parametrize("job_type_name", [None, "scripted"], ids=["django.tasks", "celery"])
def test_a_job_cancelled_while_pending_and_then_delivered_is_skipped_with_one_info_line(
    db, user, monkeypatch, caplog, django_assert_num_queries, job_type_name
):
    # Cancelling a queued job is normal, so INFO rather than a WARNING for each job of a
    # cancelled fan-out; docs/executors.md#logs says how a worker shows it.
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted", marker="cancelled while queued")
    JobHandler.cancel(user, job.pk)
    caplog.set_level(logging.INFO, logger="task_ferry")
    caplog.clear()
    # The claim's compare-and-set alone: saying why the job is skipped costs no query.
    with django_assert_num_queries(1):
        assert JobHandler.run_job(job.pk, job_type_name=job_type_name) is None
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("task_ferry", "INFO", f"Job {job.pk} is not pending; not running it.")
    ]
    assert Job.objects.get(pk=job.pk).state == JobState.CANCELLED
    assert not Marker.objects.exists()


def test_the_end_of_a_run_is_published_with_its_last_progress(
    db, user, monkeypatch, django_capture_on_commit_callbacks
):
    from task_ferry.executors.immediate import ImmediateExecutor
    from task_ferry.stores.base import get_store

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    with django_capture_on_commit_callbacks(execute=True):
        job = JobHandler.create_and_start(user, "scripted", steps=4)
    JobHandler.run_job(job.pk)
    snapshot = get_store().read(job.pk)
    assert (snapshot["state"], snapshot["user_id"]) == ("finished", user.pk)
    assert snapshot["progress_percentage"] == 100
    assert snapshot["progress_state"] == "step 4 of 4"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's one-round-trip start")
def test_start_and_load_moves_a_pending_job_to_started_and_loads_all_its_fields(
    transactional_db, user, monkeypatch
):
    from task_ferry.executors.immediate import ImmediateExecutor
    from task_ferry.handler import start_and_load

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted", steps=3, marker="fused", fail_at=2)

    started = start_and_load(job.pk, "scripted", ScriptedJob)

    assert isinstance(started, ScriptedJob)
    assert job.state == JobState.STARTED  # the caller's handle follows
    loaded = ScriptedJob.objects.get(pk=job.pk)
    assert loaded.state == JobState.STARTED and loaded.started_at == started.started_at
    for field in ScriptedJob._meta.concrete_fields:
        assert getattr(started, field.attname) == getattr(loaded, field.attname), field.name
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"  # the setting lasted for that statement only
    # The compare-and-set: a second delivery, or a wrong type, moves nothing.
    assert start_and_load(job.pk, "scripted", ScriptedJob) is None
    other = JobHandler.create_and_start(user, "scripted", steps=1)
    assert start_and_load(other.pk, "limited", ScriptedJob) is None
    assert Job.objects.get(pk=other.pk).state == JobState.PENDING


def test_a_job_run_with_its_type_name_finishes_with_its_own_fields(
    transactional_db, user, monkeypatch
):
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted", steps=2, marker="named")
    done = JobHandler.run_job(job.pk, job_type_name="scripted")
    assert done is not None and done.state == JobState.FINISHED
    assert Marker.objects.filter(name="named").count() == 1
    # A wrong type name falls back to loading the job as what it is.
    other = JobHandler.create_and_start(user, "scripted", steps=1, marker="misnamed")
    done = JobHandler.run_job(other.pk, job_type_name="limited")
    assert isinstance(done, ScriptedJob) and done.state == JobState.FINISHED
    assert JobHandler.run_job(other.pk, job_type_name="scripted") is None


@pytest.mark.parametrize("bad_id", ["abc", "", -3, 0, 2**70, "05", 5.5, None, [1], b"5"])
def test_running_an_id_no_job_can_have_says_which_before_any_query(
    db, bad_id, django_assert_num_queries
):
    # What a forged or malformed task message hands the worker: the database's own error
    # ("invalid input syntax for type bigint") named neither the id nor where it came from.
    from task_ferry.exceptions import InvalidJobId, JobDoesNotExist

    with django_assert_num_queries(0), pytest.raises(InvalidJobId) as raised:
        JobHandler.run_job(bad_id)
    assert str(raised.value).startswith(f"Cannot run job {bad_id!r}: a job id is a positive")
    assert "malformed or forged" in str(raised.value)
    assert isinstance(raised.value, JobDoesNotExist) and raised.value.job_id == bad_id


def test_a_forged_type_name_does_not_stop_the_job_it_comes_with(
    transactional_db, user, monkeypatch
):
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "scripted", steps=1, marker="forged name")
    # A digit string is an id as the API takes one; the type name is only a hint.
    done = JobHandler.run_job(str(job.pk), job_type_name=["scripted"])
    assert done is not None and done.state == JobState.FINISHED


def ticks_only(self, job, progress):
    """A run that sends the database nothing (say, it writes a file)."""
    stage = progress.create_child(represents=100, total=3)
    for i in range(3):
        stage.increment(state=f"tick {i + 1}")


def record_job_updates(statements):
    """An execute wrapper noting, for each UPDATE of the job table: its SET clause, the state
    it moves to, whether it ran inside a transaction block, and whether it turned off the wait
    for the disk."""

    def wrapper(execute, sql, params, many, context):
        if sql.startswith('UPDATE "task_ferry_job"') or sql.startswith("UPDATE `task_ferry_job`"):
            statements.append(
                {
                    "set": sql.split(" SET ")[1].split(" WHERE ")[0],
                    "to": params[0],  # every state change sets the state first
                    "inside": connection.in_atomic_block,
                    "no_flush": "synchronous_commit" in sql,
                }
            )
        return execute(sql, params, many, context)

    return wrapper


def synchronous_commit():
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's one-statement finish")
def test_a_run_that_wrote_nothing_finishes_in_a_statement_of_its_own(
    transactional_db, user, monkeypatch
):
    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", ticks_only)
    statements = []
    with connection.execute_wrapper(record_job_updates(statements)):
        job = JobHandler.create_and_start(user, "scripted")
    row = ScriptedJob.objects.get(pk=job.pk)
    assert (row.state, row.progress_percentage, row.progress_state) == ("finished", 100, "tick 3")
    finish = [(s["inside"], s["no_flush"]) for s in statements if s["to"] == "finished"]
    # No transaction block to commit around it: one round trip instead of three. Its commit
    # waits for the disk: a finished job stays finished through a database crash.
    assert finish == [(False, False)]


def test_a_run_that_wrote_finishes_inside_its_work_transaction(transactional_db, user):
    statements = []
    with connection.execute_wrapper(record_job_updates(statements)):
        job = JobHandler.create_and_start(user, "scripted", marker="work")
    assert ScriptedJob.objects.get(pk=job.pk).state == "finished"
    finish = [(s["inside"], s["no_flush"]) for s in statements if s["to"] == "finished"]
    # The work commits with its finish, and that commit waits for the disk as usual.
    assert finish == [(True, False)]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's commits without flush")
def test_only_the_moves_to_started_and_cancelled_skip_the_wait_for_the_disk(
    transactional_db, user, monkeypatch
):
    """They carry none of the job's work, and losing one in a crash leaves a job the sweep
    ends. The move to failed keeps its error; cancelling a pending job, which its worker must
    never miss after a crash, waits for the disk too."""
    from task_ferry.executors.immediate import ImmediateExecutor

    def run(self, job, progress):
        Marker.objects.create(name=job.marker)
        if job.marker == "cancel":
            progress.request_cancel()
        progress.create_child(represents=100, total=1).increment()
        raise RuntimeError("failing on purpose")

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    statements = []
    with connection.execute_wrapper(record_job_updates(statements)):
        with pytest.raises(RuntimeError, match="on purpose"):
            JobHandler.create_and_start(user, "scripted", marker="fail")
        cancelled = JobHandler.create_and_start(user, "scripted", marker="cancel")
        monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
        pending = JobHandler.create_and_start(user, "scripted")
        JobHandler.cancel(user, pending.pk)
        # Run by id alone: the long way, a compare-and-set of its own, then a load.
        by_id = JobHandler.create_and_start(user, "scripted", marker="by id")
        with pytest.raises(RuntimeError, match="on purpose"):
            JobHandler.run_job(by_id.pk)
    moves = [(s["to"], s["inside"], s["no_flush"]) for s in statements]
    assert moves == [
        ("started", False, True),
        ("failed", False, False),
        ("started", False, True),
        ("cancelled", False, True),
        ("cancelled", False, False),  # the pending one
        ("started", False, True),
        ("failed", False, False),
    ]
    failed = ScriptedJob.objects.get(marker="fail")
    assert (failed.state, failed.error) == ("failed", "RuntimeError: failing on purpose")
    states = dict(ScriptedJob.objects.values_list("pk", "state"))
    assert [states[j.pk] for j in (cancelled, pending, by_id)] == [
        "cancelled",
        "cancelled",
        "failed",
    ]
    assert not Marker.objects.exists()
    assert synchronous_commit() == "on"


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite allows one writer at a time")
def test_a_job_ended_elsewhere_keeps_that_end_when_its_run_wrote_nothing(
    transactional_db, user, monkeypatch
):
    def run(self, job, progress):
        ticks_only(self, job, progress)
        fail_elsewhere(job.pk)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    row = ScriptedJob.objects.get(pk=job.pk)
    assert (row.state, row.error) == ("failed", "lost")
    assert job.state == "failed"  # the handle was refreshed, not left at "finished"
    assert not HookCall.objects.exists()


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite allows one writer at a time")
def test_on_commit_callbacks_of_a_run_wait_for_its_finish(transactional_db, user, monkeypatch):
    """A run that only registers ``on_commit`` work (an email, say) keeps the finish inside its
    transaction, so a job ended elsewhere meanwhile never runs that work."""
    from django.db import transaction

    sent = []

    def run(self, job, progress):
        transaction.on_commit(lambda: sent.append(job.pk))
        if job.marker == "fenced":
            fail_elsewhere(job.pk)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)
    finished = JobHandler.create_and_start(user, "scripted")
    fenced = JobHandler.create_and_start(user, "scripted", marker="fenced")
    assert (finished.state, fenced.state) == ("finished", "failed")
    assert sent == [finished.pk]
