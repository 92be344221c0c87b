"""A router that reads jobs from a read replica (Django's primary/replica layout): the worker
reads and watches the job it runs where it was written, as a replica may not have it yet."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from task_ferry import signals
from task_ferry.handler import JobHandler
from task_ferry.models import Job, JobState
from task_ferry.stores.base import get_store

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "replica"]),
    # The tests' SQLite is in memory, in shared-cache mode, whose table locks refuse a write at
    # once while another connection reads the table: the monitor's heartbeats (every 0.1 s
    # here) failed the run ("database table is locked") in about one run of four. A file
    # database in WAL mode has no such locks; replicas are a server database's concern.
    pytest.mark.skipif(
        connection.vendor == "sqlite", reason="SQLite in memory: a read locks out writers"
    ),
]


@pytest.fixture(autouse=True)
def lagging_replica(settings):
    settings.DATABASE_ROUTERS = ["tests.routers.JobsReadFromALaggingReplica"]
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "HEARTBEAT_INTERVAL": 0.1,
        "PUBLISH_INTERVAL": 0.02,
    }


def test_a_job_the_replica_does_not_have_yet_runs_and_stays_published(user):
    # The run loads its job, and the monitor's heartbeat reads its row: on the replica, the
    # job would not be found, or be taken for deleted and no longer published.
    seen: list[bool] = []
    running = threading.Event()
    done = threading.Event()

    def watch_the_store():
        try:
            follow_the_store()
        finally:
            connection.close()

    def follow_the_store():
        while not done.is_set():
            # From the signal, which needs no query of the watcher's own.
            job_ids = list(started)
            if job_ids:
                snapshot = get_store().read(job_ids[0])
                if snapshot is not None and snapshot["state"] == JobState.STARTED:
                    running.set()
                if running.is_set():
                    seen.append(snapshot is not None)
            time.sleep(0.02)

    started: list[int] = []

    def remember(sender, job, **kwargs):
        started.append(job.pk)

    signals.job_started.connect(remember, dispatch_uid="test.replica.started")
    watcher = threading.Thread(target=watch_the_store)
    watcher.start()
    try:
        job = JobHandler.create_and_start(user, "scripted", steps=20, tick_delay=0.08)
    finally:
        done.set()
        watcher.join(5)
        signals.job_started.disconnect(dispatch_uid="test.replica.started")

    assert Job.objects.using("default").get(pk=job.pk).state == JobState.FINISHED
    assert not Job.objects.using("replica").exists()  # it never caught up
    # Published from the first tick to the end, through several heartbeats.
    assert running.is_set() and len(seen) >= 10
    assert all(seen), seen
    assert get_store().read(job.pk)["state"] == JobState.FINISHED
