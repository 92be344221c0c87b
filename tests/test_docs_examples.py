"""Copies of docs/testing.md's pytest examples and docs/api.md's throttle, run against the
README's job type (tests/myapp). Each copy is its page's code as written, comments aside:
test_each_copy_is_its_pages_code fails when either changes without the other. Where a page asks
the reader to adapt an example (a ``Table`` model of their own, an ``ExportedRow``,
``api_create = True``), the stand-ins below do it, through names and fixtures the copy uses."""

import datetime
from pathlib import Path

import pytest
from django.core.exceptions import ObjectDoesNotExist
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework.throttling import UserRateThrottle

from task_ferry.api.views import JobViewSet
from task_ferry.exceptions import InvalidJobValues
from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.registry import JobType
from task_ferry.signals import job_finished
from tests.code_blocks import code, definition, page_definition
from tests.myapp import job_types
from tests.myapp.job_types import ExportJobType
from tests.testapp.models import Marker

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Each copy in this module, by name, and the page whose Python block defines it.
COPIES = {
    "test_system_checks": "testing.md",
    "test_export_of_missing_table_fails": "testing.md",
    "test_table_id_is_required": "testing.md",
    "test_export_through_the_api": "testing.md",
    "test_cancel_while_running_rolls_back": "testing.md",
    "test_finished_signal": "testing.md",
    "test_old_exports_are_deleted": "testing.md",
    "ShopUserRateThrottle": "api.md",
}


@pytest.mark.parametrize(("name", "page"), COPIES.items())
def test_each_copy_is_its_pages_code(name, page):
    copy = definition(Path(__file__).read_text(), name)
    assert copy is not None, f"{name} is not defined in {Path(__file__).name}"
    assert code(copy) == code(page_definition(DOCS / page, name)), (
        f"{name} differs from docs/{page}'s: copy the page's code here, or the change back there"
    )


# This module's tests of its own, which copy no page.
OWN_TESTS = {
    "test_each_copy_is_its_pages_code",
    "test_every_test_here_is_a_copy_or_our_own",
    "test_table_id_is_required_holds_for_a_type_without_prepare_values",
    "test_the_api_refuses_the_readmes_type_without_api_create",
    "test_the_throttle_that_leaves_job_polls_out_of_a_rate",
}


def test_every_test_here_is_a_copy_or_our_own():
    tests = {name for name in globals() if name.startswith("test_")}
    assert tests - OWN_TESTS == {name for name in COPIES if name.startswith("test_")}


class Table:
    """docs/testing.md's ``Table`` model of the reader's app, as far as its test uses it."""

    class DoesNotExist(ObjectDoesNotExist):
        pass


@pytest.fixture
def no_table_404(monkeypatch):
    """The page's ``fetch_rows``, taken to read ``Table.objects.get(pk=table_id)``: there is
    no table 404."""
    readmes_fetch_rows = job_types.fetch_rows

    def fetch_rows(table_id):
        if table_id == 404:
            raise Table.DoesNotExist("Table matching query does not exist.")
        return readmes_fetch_rows(table_id)

    monkeypatch.setattr(job_types, "fetch_rows", fetch_rows)


# docs/testing.md's ``ExportedRow``: a model the reader's write_to_file saves a row of per row
# written. A Marker row survives only if the job's transaction committed.
ExportedRow = Marker


@pytest.fixture
def rows_exported(monkeypatch):
    """The README's ``write_to_file``, saving an ``ExportedRow`` per row, as the page's does."""
    monkeypatch.setattr(
        job_types, "write_to_file", lambda row: ExportedRow.objects.create(name=f"row {row.id}")
    )


@pytest.fixture
def api_create(monkeypatch):
    """The page's "With `api_create = True` added to it"."""
    monkeypatch.setattr(ExportJobType, "api_create", True)


def test_system_checks():
    call_command("check")  # raises SystemCheckError, which lists every error and its fix


@pytest.mark.usefixtures("no_table_404")
def test_export_of_missing_table_fails(db, user):
    with pytest.raises(Table.DoesNotExist):
        JobHandler.create_and_start(user, "export_table", table_id=404)
    job = Job.objects.get()
    assert job.state == "failed"
    assert "DoesNotExist" in job.error


def test_table_id_is_required(db, user):
    with pytest.raises(InvalidJobValues, match="table_id"):
        JobHandler.create_and_start(user, "export_table")
    assert not Job.objects.exists()


def test_table_id_is_required_holds_for_a_type_without_prepare_values(db, user, monkeypatch):
    # The page: a type that leaves the missing field to the model's validation (Job types'
    # ExportJobType) gets a message that names the field too.
    monkeypatch.setattr(ExportJobType, "prepare_values", JobType.prepare_values)
    with pytest.raises(InvalidJobValues, match="table_id") as excinfo:
        JobHandler.create_and_start(user, "export_table")
    assert "table_id is required" not in str(excinfo.value)  # not the README's message
    assert not Job.objects.exists()


def test_the_api_refuses_the_readmes_type_without_api_create(db, user):
    client = APIClient()
    client.force_authenticate(user)
    response = client.post("/api/jobs/", {"type": "export_table", "table_id": 1}, format="json")
    assert response.status_code == 400
    assert response.json()["type"][0].startswith("No job type named 'export_table'")


@pytest.mark.usefixtures("api_create")
def test_export_through_the_api(db, user):
    client = APIClient()
    client.force_authenticate(user)
    response = client.post("/api/jobs/", {"type": "export_table", "table_id": 1}, format="json")
    assert response.status_code == 201
    assert response.json()["state"] == "finished"  # the ImmediateExecutor ran it


@pytest.mark.usefixtures("rows_exported")
def test_cancel_while_running_rolls_back(db, user, monkeypatch):
    write_to_file = job_types.write_to_file
    written = []

    def write_then_cancel(row):
        write_to_file(row)
        written.append(row)
        if len(written) == 3:
            JobHandler.cancel_job(Job.objects.get())

    monkeypatch.setattr(job_types, "write_to_file", write_then_cancel)
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    assert job.state == "cancelled"
    assert len(written) == 3  # it stopped at the increment() after the third row
    assert not ExportedRow.objects.exists()  # the rows it wrote were rolled back


def test_finished_signal(db, user):
    seen = []
    receiver = lambda sender, job, **kwargs: seen.append(job.pk)  # noqa: E731
    job_finished.connect(receiver)
    try:
        job = JobHandler.create_and_start(user, "export_table", table_id=1)
    finally:
        job_finished.disconnect(receiver)
    assert seen == [job.pk]


def test_old_exports_are_deleted(db, user):
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - datetime.timedelta(days=8))
    assert JobHandler.cleanup_old_jobs() == 1


class ShopUserRateThrottle(UserRateThrottle):
    def allow_request(self, request, view):
        if "task_ferry" in request.resolver_match.namespaces:
            return True
        return super().allow_request(request, view)


def test_the_throttle_that_leaves_job_polls_out_of_a_rate(db, user, monkeypatch, no_dispatch):
    # A view's throttle classes and rates are read from REST_FRAMEWORK when DRF is imported,
    # before a test could change the setting: set them where DRF put them.
    class OnePerMinute(ShopUserRateThrottle):
        rate = "1/min"

    class StockOnePerMinute(UserRateThrottle):
        rate = "1/min"

    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    client = APIClient()
    client.force_authenticate(user)
    monkeypatch.setattr(JobViewSet, "throttle_classes", [StockOnePerMinute])
    statuses = [client.get(f"/api/jobs/{job.pk}/").status_code for _ in range(2)]
    assert statuses == [200, 429]

    monkeypatch.setattr(JobViewSet, "throttle_classes", [OnePerMinute])
    statuses = [client.get(f"/api/jobs/{job.pk}/").status_code for _ in range(3)]
    statuses.append(client.post(f"/api/jobs/{job.pk}/cancel/").status_code)
    assert statuses == [200, 200, 200, 200]
