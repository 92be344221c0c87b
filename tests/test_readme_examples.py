"""The two test examples of the README, verbatim, and the spec's original second one; and
docs/testing.md's version of them for Django's test runner. Each copy of an example, here and
the README's model and job type in tests/myapp, is checked against its page's code."""

import ast
from pathlib import Path
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.test import TestCase

from task_ferry.executors.immediate import ImmediateExecutor
from task_ferry.handler import JobHandler
from tests.code_blocks import code, definition, is_excerpt, page_definition, page_definitions

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TESTING = ROOT / "docs" / "testing.md"

# Each copy: the file it is in, its name, and the page whose Python block defines it.
COPIES = [
    ("tests/test_readme_examples.py", "test_export_creates_file", README),
    ("tests/test_readme_examples.py", "test_export_creates_file", TESTING),
    ("tests/test_readme_examples.py", "test_cancel_cleans_up", README),
    ("tests/test_readme_examples.py", "test_cancel_cleans_up", TESTING),
    ("tests/test_readme_examples.py", "ExportTests", TESTING),
    ("tests/myapp/models.py", "ExportJob", README),
    ("tests/myapp/job_types.py", "Row", README),
    ("tests/myapp/job_types.py", "fetch_rows", README),
    ("tests/myapp/job_types.py", "write_to_file", README),
]


@pytest.mark.parametrize(
    ("path", "name", "page"),
    [pytest.param(*copy, id=f"{copy[1]}-{copy[2].name}") for copy in COPIES],
)
def test_each_copy_is_its_pages_code(path, name, page):
    copy = definition((ROOT / path).read_text(), name)
    assert copy is not None, f"{name} is not defined in {path}"
    assert code(copy) == code(page_definition(page, name)), (
        f"{path}'s {name} differs from {page.name}'s: copy the page's code there, or back"
    )


def test_the_job_type_is_the_readmes_class_with_its_on_cancelled():
    # The README shows the class whole, then again in part with its on_cancelled.
    whole, excerpt = page_definitions(README, "ExportJobType")
    assert isinstance(whole, ast.ClassDef) and isinstance(excerpt, ast.ClassDef)
    assert not is_excerpt(whole) and is_excerpt(excerpt)
    whole.body += [
        item
        for item in excerpt.body
        if isinstance(item, ast.FunctionDef) and item.name == "on_cancelled"
    ]
    copy = definition((ROOT / "tests/myapp/job_types.py").read_text(), "ExportJobType")
    assert copy is not None
    assert code(copy) == code(whole)


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


# docs/testing.md's "With Django's test runner": the two tests above as a TestCase, verbatim.


class ExportTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.user = get_user_model().objects.create_user("alice")

    def test_export_creates_file(self):
        job = JobHandler.create_and_start(self.user, "export_table", table_id=1)
        job.refresh_from_db()
        self.assertEqual(job.state, "finished")
        self.assertNotEqual(job.output_path, "")

    @mock.patch.object(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    def test_cancel_cleans_up(self):
        job = JobHandler.create_and_start(self.user, "export_table", table_id=1)
        with self.captureOnCommitCallbacks(execute=True):  # runs on_cancelled
            JobHandler.cancel(self.user, job.id)
        self.assertEqual(job.state, "cancelled")


# What the page says of those besides: the ImmediateExecutor needs no commit.


class ImmediateExecutorInATestCaseTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.user = get_user_model().objects.create_user("alice")

    def test_the_immediate_executor_runs_the_job_without_a_commit(self):
        # What the page says: no captureOnCommitCallbacks needed, and none captured.
        with self.captureOnCommitCallbacks() as callbacks:
            job = JobHandler.create_and_start(self.user, "export_table", table_id=1)
        self.assertEqual(job.state, "finished")
        self.assertEqual(callbacks, [])
