"""A job that the test holds halfway through its run, in a thread of the test process: its
transaction open, its row written, its progress published (the ``gated`` fixture registers
its type)."""

import threading

import pytest
from django.db import connection

from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.registry import JobType
from tests.testapp.models import HookCall, Marker, ScriptedJob
from tests.waiting import wait_for

WAIT = 10


class GatedJobType(JobType):
    """Writes a row, ticks half its steps, then waits for the test before ticking the rest."""

    type = "gated"
    model_class = ScriptedJob

    def __init__(self):
        self.halfway = threading.Event()
        self.release = threading.Event()
        self.progress = None

    def run(self, job, progress):
        if job.lock_own_row:
            ScriptedJob.objects.select_for_update().get(pk=job.pk)
        Marker.objects.create(name=f"gated {job.pk}")
        stage = progress.create_child(represents=100, total=job.steps)
        half = job.steps // 2
        for i in range(half):
            stage.increment(state=f"step {i + 1}")
        self.progress = progress
        self.halfway.set()
        assert self.release.wait(WAIT)
        for i in range(half, job.steps):
            stage.increment(state=f"step {i + 1}")
        job.result = "done"
        job.save(update_fields=["result"])

    def on_cancelled(self, job):
        HookCall.objects.create(job_id=job.pk, hook="on_cancelled")


class JobThread(threading.Thread):
    """Runs ``create_and_start`` on its own thread and database connection."""

    def __init__(self, user, **values):
        super().__init__(daemon=True)
        self.user = user
        self.values = values
        self.error = None

    def run(self):
        try:
            JobHandler.create_and_start(self.user, "gated", **self.values)
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()

    def finish(self):
        self.join(WAIT)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def start_halfway(gated, user, **values):
    thread = JobThread(user, **values)
    thread.start()
    assert gated.halfway.wait(WAIT), thread.error
    return thread, Job.objects.get(user=user, type="gated")


def wait_until(predicate, what):
    return wait_for(predicate, timeout=WAIT, interval=0.01, what=what)


needs_concurrent_writers = pytest.mark.skipif(
    connection.vendor == "sqlite", reason="SQLite allows one writer at a time"
)
