"""Jobs in a database of their own (a router sends ``Job`` to the "jobs" alias): creating,
limiting, running, sweeping and cleaning up take their transactions and locks there."""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Iterator

import pytest
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections, transaction
from django.db.backends.dummy.base import DatabaseWrapper as NoDatabase
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from task_ferry.exceptions import MaxJobCountExceeded
from task_ferry.handler import JobHandler
from task_ferry.models import Job, JobState
from task_ferry.runner import DATABASE_FAILURE
from tests.backends import end_sessions, other_sessions
from tests.reliability.helpers import hook_calls, start_lost_job, state_of
from tests.testapp.models import HookCall, Marker
from tests.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "jobs"])


@pytest.fixture(autouse=True)
def routed(settings):
    settings.DATABASE_ROUTERS = ["tests.routers.JobsInTheirOwnDatabase"]


def test_max_count_is_enforced(queueing, user):
    JobHandler.create_and_start(user, "limited")
    JobHandler.create_and_start(user, "limited")
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start(user, "limited")
    assert Job.objects.count() == 2


# Two connections to one SQLite database cannot both write at once; a project that routes jobs
# elsewhere on SQLite gives them a file of their own.
runs_on_both = pytest.mark.skipif(
    connection.vendor == "sqlite", reason="the two aliases share one SQLite database"
)


@runs_on_both
def test_a_job_runs_to_finished_and_its_work_commits(user):
    job = JobHandler.create_and_start(user, "scripted", steps=2, marker="routed-run")
    assert state_of(job) == JobState.FINISHED
    assert Marker.objects.filter(name="routed-run").exists()


@runs_on_both
def test_a_failing_run_rolls_back_its_work_and_fails_the_job(user):
    with pytest.raises(RuntimeError, match="scripted failure"):
        JobHandler.create_and_start(user, "scripted", steps=2, fail_at=1, marker="rolled-back")
    assert list(Job.objects.values_list("state", flat=True)) == [JobState.FAILED]
    assert not Marker.objects.filter(name="rolled-back").exists()


@runs_on_both
def test_a_connection_lost_on_default_fails_the_job_as_a_lost_connection(queueing, user):
    """The run's transaction on ``default`` (where its work goes) breaks, not the one on the
    jobs' database: the user is told the connection was lost all the same."""
    job = JobHandler.create_and_start(user, "scripted", block_for=1.5, steps=2, marker="dropped")
    runner = threading.Thread(target=run_in_a_thread_of_its_own, args=(job.pk,))
    runner.start()
    try:
        # Only the run's connection to ``default`` has written anything (the marker) so far.
        # InnoDB refreshes its list of transactions only if last read over 0.1 s before.
        sessions = wait_for(lambda: other_sessions(in_transaction=True), interval=0.15)
        assert len(sessions) == 1
        end_sessions(sessions)
    finally:
        runner.join(timeout=30)

    job = Job.objects.get(pk=job.pk)
    assert job.state == JobState.FAILED
    assert job.human_readable_error == DATABASE_FAILURE
    assert not Marker.objects.filter(name="dropped").exists()
    assert hook_calls(job, "on_error") == 1


def run_in_a_thread_of_its_own(job_id: int) -> None:
    try:
        JobHandler.run_job(job_id)
    except DatabaseError:
        pass
    finally:
        connections.close_all()


def test_the_sweep_fails_a_job_whose_worker_was_lost(queueing, user):
    job = start_lost_job(user)
    assert JobHandler.sweep_stale_jobs() == 1
    assert state_of(job) == JobState.FAILED
    assert hook_calls(job, "on_error") == 1


@contextlib.contextmanager
def queries_by_alias() -> Iterator[dict[str, CaptureQueriesContext]]:
    """The statements this thread sends through each of the two aliases meanwhile."""
    with contextlib.ExitStack() as stack:
        yield {
            alias: stack.enter_context(CaptureQueriesContext(connections[alias]))
            for alias in ("default", "jobs")
        }


def statements(captured: CaptureQueriesContext, kind: str, *words: str) -> list[str]:
    """The captured statements of ``kind`` (``"DELETE"``, ...) that contain each of ``words``."""
    return [
        query["sql"]
        for query in captured.captured_queries
        if query["sql"].lstrip().upper().startswith(kind)
        and all(word.lower() in query["sql"].lower() for word in words)
    ]


def writes(captured: CaptureQueriesContext) -> list[str]:
    return [sql for kind in ("INSERT", "UPDATE", "DELETE") for sql in statements(captured, kind)]


def test_cleanup_deletes_old_jobs(settings, queueing, user):
    # Jobs read through "default": the deletes, the lock that keeps two cleanups apart, and the
    # reads of the jobs to delete (a replica may still show jobs another cleanup deleted) must
    # still go where jobs are written.
    settings.DATABASE_ROUTERS = [f"{__name__}.JobsWrittenToTheirDatabaseReadFromAnother"]
    job = JobHandler.create_and_start(user, "scripted")
    JobHandler.cancel(user, job.pk)
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - datetime.timedelta(days=60))
    with queries_by_alias() as captured:
        assert JobHandler.cleanup_old_jobs(older_than=datetime.timedelta(days=30)) == 1
    assert not Job.objects.exists()
    assert HookCall.objects.filter(job_id=job.pk, hook="before_delete").count() == 1
    assert statements(captured["jobs"], "DELETE", Job._meta.db_table)
    assert not statements(captured["default"], "DELETE")
    assert not statements(captured["default"], "SELECT", Job._meta.db_table)
    lock = {"postgresql": "advisory_xact_lock", "mysql": "GET_LOCK("}.get(connection.vendor)
    if lock is not None:
        assert statements(captured["jobs"], "SELECT", lock)
        assert not statements(captured["default"], "SELECT", lock)


def test_create_inside_the_callers_transaction_on_the_jobs_database(queueing, user):
    with (
        queries_by_alias() as captured,
        pytest.raises(RuntimeError),
        transaction.atomic(using="jobs"),
    ):
        JobHandler.create_and_start(user, "limited")
        raise RuntimeError("roll back")
    assert not Job.objects.exists()
    assert queueing.dispatched == []
    # max_count's lock on the user's row and the job's rows: all in the caller's transaction.
    users = user._meta.db_table
    locked = statements(captured["jobs"], "SELECT", users)
    assert locked and ("FOR UPDATE" in locked[0]) is connection.features.has_select_for_update
    assert statements(captured["jobs"], "INSERT", Job._meta.db_table)
    assert not statements(captured["default"], "SELECT", users)
    assert not writes(captured["default"])


class JobsWrittenToTheirDatabaseReadFromAnother:
    """A primary/replica router: jobs are written through "jobs", read through "default" (a
    connection of its own, which sees only what is committed)."""

    def db_for_write(self, model, **hints):
        if issubclass(model, Job) or model._meta.app_label == "task_ferry":
            return "jobs"
        return None

    def allow_relation(self, obj1, obj2, **hints):
        return True


def test_max_count_counts_the_live_jobs_where_the_users_lock_is_held(settings, queueing, user):
    # The count must see the jobs of the transaction that holds the user's lock, not a replica.
    settings.DATABASE_ROUTERS = [f"{__name__}.JobsWrittenToTheirDatabaseReadFromAnother"]
    with pytest.raises(MaxJobCountExceeded), transaction.atomic(using="jobs"):
        for _ in range(3):
            JobHandler.create_and_start(user, "limited")
    assert not Job.objects.exists()


class EverythingInTheJobsDatabase:
    def db_for_read(self, model, **hints):
        return "jobs"

    db_for_write = db_for_read

    def allow_relation(self, obj1, obj2, **hints):
        return True


@pytest.fixture
def empty_default(settings):
    """Django's multi-database layout with ``"default": {}``: a router sends every model
    elsewhere, and ``default`` is the dummy backend Django puts in its place."""
    settings.DATABASE_ROUTERS = [f"{__name__}.EverythingInTheJobsDatabase"]
    real = connections[DEFAULT_DB_ALIAS]
    connections[DEFAULT_DB_ALIAS] = NoDatabase(
        {**real.settings_dict, "ENGINE": "django.db.backends.dummy"}, DEFAULT_DB_ALIAS
    )
    yield
    connections[DEFAULT_DB_ALIAS] = real


def test_a_job_runs_where_default_is_left_empty(user, empty_default):
    job = JobHandler.create_and_start(user, "scripted", steps=2, marker="no-default")
    assert job.state == JobState.FINISHED
    assert Job.objects.using("jobs").get().state == JobState.FINISHED
    assert Marker.objects.using("jobs").filter(name="no-default").exists()
