"""The two test examples of the README, verbatim, and the spec's original second one."""

from task_ferry.handler import JobHandler


def test_export_creates_file(db, user):
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    job.refresh_from_db()
    assert job.state == "finished"
    assert job.output_path != ""


def test_cancel_cleans_up(db, user, monkeypatch, django_capture_on_commit_callbacks):
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    with django_capture_on_commit_callbacks(execute=True):  # runs on_cancelled
        JobHandler.cancel(user, job.id)
    assert job.state == "cancelled"


def test_cancel_cleans_up_as_the_original_spec_wrote_it(db, user, monkeypatch):
    # The spec's own version, without the capture block: the state changes all the same.
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    JobHandler.cancel(user, job.id)
    assert job.state == "cancelled"


# What the README says of the second: under `db` the test's transaction never commits, so
# without the block the cancelled job's on_cancelled (here: deleting its file) never runs.


def test_on_cancelled_runs_in_a_db_test_only_inside_the_capture_block(
    db, user, monkeypatch, tmp_path, django_capture_on_commit_callbacks
):
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    kept, deleted = tmp_path / "kept.csv", tmp_path / "deleted.csv"
    for path in (kept, deleted):
        path.write_text("partial")
    job = JobHandler.create_and_start(user, "export_table", table_id=1, output_path=str(kept))
    JobHandler.cancel(user, job.id)
    assert job.state == "cancelled"
    assert kept.exists()

    job = JobHandler.create_and_start(user, "export_table", table_id=1, output_path=str(deleted))
    with django_capture_on_commit_callbacks(execute=True):
        JobHandler.cancel(user, job.id)
    assert job.state == "cancelled"
    assert not deleted.exists()
