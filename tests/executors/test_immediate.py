"""ImmediateExecutor: each job runs inline, and the job handed back shows how its run ended."""

import pytest

from task_ferry.handler import JobHandler
from task_ferry.registry import job_type_registry
from task_ferry.signals import job_started
from tests.testapp.models import ScriptedJob


def fields_of(job):
    return {f.attname: getattr(job, f.attname) for f in type(job)._meta.concrete_fields}


def as_stored(job):
    return fields_of(type(job)._base_manager.get(pk=job.pk))


def test_the_job_returned_shows_its_row_after_the_run_own_fields_included(db, user):
    job = JobHandler.create_and_start(user, "scripted", steps=3)
    assert (job.state, job.progress_percentage, job.result) == ("finished", 100, "done")
    assert fields_of(job) == as_stored(job)


def test_the_readme_job_shows_the_output_path_its_run_saved(db, user):
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    assert (job.state, job.output_path) == ("finished", "/exports/result.csv")
    job.refresh_from_db()  # the README's tests still call it
    assert (job.state, job.output_path) == ("finished", "/exports/result.csv")


def test_a_job_cancelled_while_it_ran_shows_its_row_not_the_writes_rolled_back(
    db, user, monkeypatch
):
    def run(self, job, progress):
        job.result = "written, then rolled back"
        job.save(update_fields=["result"])
        progress.increment(10)

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "run", run)

    def cancel_now(sender, job, **kwargs):
        JobHandler.cancel_job(job)

    job_started.connect(cancel_now)
    try:
        job = JobHandler.create_and_start(user, "scripted")
    finally:
        job_started.disconnect(cancel_now)
    assert (job.state, job.result) == ("cancelled", "")
    assert fields_of(job) == as_stored(job)


def test_each_job_of_a_batch_shows_its_row_after_its_run(db, user):
    jobs = JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}, {"steps": 2}])
    assert [(job.state, job.result) for job in jobs] == [("finished", "done")] * 2
    assert [fields_of(job) for job in jobs] == [as_stored(job) for job in jobs]


def test_a_jobs_error_still_reaches_the_caller_after_it_is_marked_failed(db, user):
    with pytest.raises(RuntimeError, match="scripted failure at step 1"):
        JobHandler.create_and_start(user, "scripted", steps=3, fail_at=1)
    assert ScriptedJob.objects.get().state == "failed"


def test_a_job_the_executor_did_not_run_stays_as_created(db, user, no_dispatch):
    job = JobHandler.create_and_start(user, "scripted")
    assert (job.state, no_dispatch) == ("pending", [job.pk])
    assert fields_of(job) == as_stored(job)
