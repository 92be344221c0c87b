"""Job rows written directly, as the state a test starts from (no handler, hooks or executor),
and what the system checks then say of the stale ones."""

from datetime import timedelta

from django.contrib.contenttypes.models import ContentType
from django.core.checks import CheckMessage, run_checks
from django.db import connection
from django.utils import timezone

from task_ferry.models import Heartbeat, Job, JobState
from tests.testapp.models import ScriptedJob


def make_job(user=None, state=JobState.PENDING, **fields):
    """A job row as the handler would create it, without running it."""
    job = ScriptedJob.objects.create(
        type="scripted",
        content_type=ContentType.objects.get_for_model(ScriptedJob),
        user=user,
        state=state,
        **fields,
    )
    return job


def started_job(*, started_ago: timedelta, beat_ago: timedelta | None = None):
    """A started job, with a heartbeat ``beat_ago`` old, or none yet."""
    now = timezone.now()
    job = make_job(None)
    Job.objects.filter(pk=job.pk).update(
        state=JobState.STARTED, created_at=now - started_ago, started_at=now - started_ago
    )
    if beat_ago is not None:
        Heartbeat.objects.create(job_id=job.pk, worker="w:1", beat_at=now - beat_ago)
    return job


def pending_job(*, created_ago: timedelta):
    job = make_job(None)
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - created_ago)
    return job


def sweep_messages() -> list[CheckMessage]:
    """The system checks' warnings of jobs the stale-job sweep should have failed (W007)."""
    return [m for m in run_checks(databases=[connection.alias]) if m.id == "task_ferry.W007"]
