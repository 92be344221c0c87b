"""Shared helpers of the reliability tests."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from task_ferry.handler import JobHandler, transition
from task_ferry.models import Heartbeat, Job, JobState
from tests.testapp.models import HookCall

# Row locks and concurrent writers: SQLite serialises every write; PostgreSQL and MySQL have both.
needs_row_locks = pytest.mark.skipif(
    connection.vendor == "sqlite", reason="needs row locks and concurrent writers"
)


def start_lost_job(user: Any, job_type: str = "scripted", *, silent_for: float = 3600) -> Job:
    """A started job whose worker last beat ``silent_for`` seconds ago, as after a crash."""
    job = JobHandler.create_and_start(user, job_type)
    assert transition(job, JobState.STARTED, from_states=[JobState.PENDING])
    Heartbeat.objects.create(
        job_id=job.pk,
        worker="gone:1",
        beat_at=timezone.now() - datetime.timedelta(seconds=silent_for),
    )
    return job


def hook_calls(job: Job | int, hook: str) -> int:
    job_id = job if isinstance(job, int) else job.pk
    return HookCall.objects.filter(job_id=job_id, hook=hook).count()


def state_of(job: Job | int) -> str:
    job_id = job if isinstance(job, int) else job.pk
    return str(Job.objects.values_list("state", flat=True).get(pk=job_id))
