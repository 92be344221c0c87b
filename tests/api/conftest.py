import datetime

import pytest
from django.conf import settings
from django.test import TestCase
from django.utils import timezone
from rest_framework.test import APIClient

from task_ferry.executors.immediate import ImmediateExecutor
from task_ferry.handler import JobHandler, publish, transition
from task_ferry.models import JobState
from task_ferry.stores.base import get_store
from tests.registration import LinkedJobType, registered_for_the_test

needs_redis = pytest.mark.skipif(
    not settings.TASK_FERRY.get("REDIS_URL"), reason="needs the Redis progress store"
)


@pytest.fixture(autouse=True)
def export_table_by_api(monkeypatch):
    """The README's export type (tests/myapp, as the README writes it) opted in to creation
    through the API, as a project would with ``api_create = True``."""
    from tests.myapp.job_types import ExportJobType

    monkeypatch.setattr(ExportJobType, "api_create", True)


class LinkedByApiJobType(LinkedJobType):
    """The handler tests' type with many-to-many fields (``markers``, and ``tags`` through a
    model of the project's), opted in to creation through the API."""

    api_create = True


linked_by_api = registered_for_the_test(LinkedByApiJobType)


@pytest.fixture
def hold(monkeypatch):
    """Jobs stay pending: the executor takes nothing."""
    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)


@pytest.fixture
def store():
    return get_store()


@pytest.fixture
def staff(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("carol", password="pw", is_staff=True)


@pytest.fixture
def session_api(user):
    """A client logged in through the session, as a browser is."""
    client = APIClient()
    client.force_login(user)
    return client


def client_for(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def start(job, *, percentage=0, label="", started_ago=0.0):
    """Move a pending job to started as a worker would, and publish its progress."""
    assert transition(job, JobState.STARTED, from_states=[JobState.PENDING])
    if started_ago:
        job.started_at = timezone.now() - datetime.timedelta(seconds=started_ago)
    job.progress_percentage = percentage
    job.progress_state = label
    publish(job)
    return job


def create(user, type_name="scripted", **values):
    """Create a job as a request would, and run what waits for its commit (the executor's
    dispatch): the test's own transaction never commits."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return JobHandler.create_and_start(user, type_name, **values)
