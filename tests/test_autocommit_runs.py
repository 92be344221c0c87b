"""A job type with ``atomic = False``: its run's writes commit as they go and stay, whatever
the job's end."""

import threading

import pytest
from django.db import InterfaceError, OperationalError, connection, connections

from task_ferry.handler import JobHandler
from task_ferry.registry import job_type_registry
from task_ferry.runner import DATABASE_FAILURE
from tests.backends import end_sessions, our_session_id
from tests.testapp.models import HookCall, Marker, ScriptedJob


@pytest.fixture
def scripted_type(monkeypatch):
    """The scripted job type, run in autocommit mode for the test."""
    job_type_class = type(job_type_registry.get("scripted"))
    monkeypatch.setattr(job_type_class, "atomic", False)
    return job_type_class


def seen_from_another_connection(name):
    """Whether another session of the database sees the marker ``name`` (committed)."""
    seen = []

    def look():
        try:
            seen.append(Marker.objects.filter(name=name).exists())
        finally:
            connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    return seen == [True]


def test_each_write_of_the_run_is_committed_at_once(
    transactional_db, user, scripted_type, monkeypatch
):
    seen_while_running = []

    def run(self, job, progress):
        for row in range(3):
            Marker.objects.create(name=f"row {row}")
            seen_while_running.append(seen_from_another_connection(f"row {row}"))
            progress.increment(30)

    monkeypatch.setattr(scripted_type, "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    assert seen_while_running == [True, True, True]
    assert (ScriptedJob.objects.get(pk=job.pk).state, job.state) == ("finished", "finished")
    assert not connection.in_atomic_block


def test_a_failed_run_keeps_what_it_wrote(transactional_db, user, scripted_type):
    with pytest.raises(RuntimeError, match="scripted failure at step 3"):
        JobHandler.create_and_start(user, "scripted", steps=10, fail_at=3, marker="kept")
    job = ScriptedJob.objects.get()
    assert (job.state, job.error) == ("failed", "RuntimeError: scripted failure at step 3")
    assert job.progress_percentage == 30
    assert Marker.objects.filter(name="kept").exists()
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_error"]


def test_a_cancelled_run_keeps_what_it_wrote(transactional_db, user, scripted_type, monkeypatch):
    def run(self, job, progress):
        Marker.objects.create(name="kept")
        JobHandler.cancel(user, job.pk)
        progress.increment(10)
        Marker.objects.create(name="never")

    monkeypatch.setattr(scripted_type, "run", run)
    job = JobHandler.create_and_start(user, "scripted")
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"
    assert list(Marker.objects.values_list("name", flat=True)) == ["kept"]
    assert list(HookCall.objects.values_list("hook", flat=True)) == ["on_cancelled"]


@pytest.mark.direct_connection  # ends its server session
def test_a_run_whose_connection_is_lost_fails_saying_so(
    transactional_db, user, scripted_type, monkeypatch
):
    if connection.vendor not in ("postgresql", "mysql"):
        pytest.skip("sessions are ended by the database server")

    def run(self, job, progress):
        Marker.objects.create(name="kept")
        session = our_session_id()
        # Ended from another connection (a thread has its own), as a server restart would.
        ender = threading.Thread(target=lambda: (end_sessions([session]), connection.close()))
        ender.start()
        ender.join(10)
        Marker.objects.create(name="never")

    monkeypatch.setattr(scripted_type, "run", run)
    with pytest.raises((InterfaceError, OperationalError)):
        JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert (job.state, job.human_readable_error) == ("failed", DATABASE_FAILURE)
    assert list(Marker.objects.values_list("name", flat=True)) == ["kept"]
