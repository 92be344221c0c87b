import pytest
from rest_framework.test import APIClient

from task_ferry.executors.immediate import ImmediateExecutor
from task_ferry.stores.base import get_store
from tests.api.helpers import LinkedByApiJobType
from tests.registration import registered_for_the_test


@pytest.fixture(autouse=True)
def export_table_by_api(monkeypatch):
    """The README's export type (tests/myapp, as the README writes it) opted in to creation
    through the API, as a project would with ``api_create = True``."""
    from tests.myapp.job_types import ExportJobType

    monkeypatch.setattr(ExportJobType, "api_create", True)


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
