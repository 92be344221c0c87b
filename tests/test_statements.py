"""The hand-written statements choose the ORM's way wherever theirs would be wrong."""

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction

from task_ferry import statements
from task_ferry.models import Job, JobState
from tests.testapp.models import ScriptedJob

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the one-statement paths are PostgreSQL's"
)


class ScriptedJobsReadFromAReplica:
    def db_for_read(self, model, **hints):
        return "replica" if model is ScriptedJob else None


def new_job():
    return ScriptedJob(
        type="scripted", content_type=ContentType.objects.get_for_model(ScriptedJob), steps=1
    )


def test_reads_routed_to_a_replica_keep_the_one_statement_insert_and_the_fused_load(
    transactional_db, settings
):
    settings.DATABASE_ROUTERS = [f"{__name__}.ScriptedJobsReadFromAReplica"]
    job = new_job()
    assert statements.insert_job(job)
    # The worker loads the job where it was written: a replica may not have it yet.
    started = statements.start_and_load(job.pk, "scripted", ScriptedJob)
    assert started is not None
    assert (started.pk, started.state, started._state.db) == (job.pk, JobState.STARTED, "default")
    assert Job.objects.get(pk=job.pk).state == JobState.STARTED


def test_inside_a_transaction_both_leave_the_work_to_the_orm(transactional_db):
    job = new_job()
    with transaction.atomic():
        assert not statements.insert_job(job)
        assert job.pk is None
        job.save()
        assert statements.start_and_load(job.pk, "scripted", ScriptedJob) is None
    assert statements.compare_and_set(job.pk, [JobState.PENDING], {"state": JobState.CANCELLED})
    assert not statements.compare_and_set(job.pk, [JobState.PENDING], {"state": JobState.FAILED})
    assert Job.objects.get(pk=job.pk).state == JobState.CANCELLED
