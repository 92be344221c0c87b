"""Copies of docs/testing.md's pytest examples and docs/api.md's throttle, run against the
README's job type (tests/myapp). Where a page asks the reader to adapt an example (a ``Table``
model of their own, ``api_create = True``), the test says how it does. They are copies: a
change to one of those examples belongs here too."""

import datetime

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework.throttling import UserRateThrottle

from task_ferry.api.views import JobViewSet
from task_ferry.exceptions import InvalidJobValues
from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.registry import JobType
from task_ferry.signals import job_finished, job_started
from tests.myapp import job_types
from tests.myapp.job_types import ExportJobType


def test_system_checks():
    call_command("check")  # raises SystemCheckError, which lists every error and its fix


def test_export_of_missing_table_fails(db, user, monkeypatch):
    # The page's own advice for the README's stand-in: make it raise for that id.
    def fetch_rows(table_id):
        raise ValueError(f"No table {table_id}")

    monkeypatch.setattr(job_types, "fetch_rows", fetch_rows)
    with pytest.raises(ValueError):
        JobHandler.create_and_start(user, "export_table", table_id=404)
    job = Job.objects.get()
    assert job.state == "failed"
    assert "ValueError" in job.error


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


@pytest.fixture
def api_create(monkeypatch):
    """The page's "With `api_create = True` added to it"."""
    monkeypatch.setattr(ExportJobType, "api_create", True)


def test_export_through_the_api(db, user, api_create):
    client = APIClient()
    client.force_authenticate(user)
    response = client.post("/api/jobs/", {"type": "export_table", "table_id": 1}, format="json")
    assert response.status_code == 201
    assert response.json()["state"] == "finished"  # the ImmediateExecutor ran it


def test_cancel_while_running_rolls_back(db, user):
    def cancel_now(sender, job, **kwargs):
        JobHandler.cancel_job(job)

    job_started.connect(cancel_now)
    try:
        job = JobHandler.create_and_start(user, "export_table", table_id=50)
    finally:
        job_started.disconnect(cancel_now)
    assert job.state == "cancelled"
    # No ExportedRow here: the README's stand-in writes nothing. The row says it too.
    job.refresh_from_db()
    assert (job.state, job.output_path) == ("cancelled", "")


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
