import sys

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import caches
from rest_framework.test import APIClient


def pytest_sessionfinish(session, exitstatus):
    """Leave the shared RabbitMQ without this run's queues."""
    celery_fixtures = sys.modules.get("tests.workers.celery_fixtures")
    if celery_fixtures is not None:
        celery_fixtures.delete_session_queues()


@pytest.fixture
def no_dispatch(monkeypatch):
    """Jobs stay pending, as if no worker had taken them yet; the ids handed to the (immediate)
    executor are recorded."""
    from task_ferry.executors.immediate import ImmediateExecutor

    dispatched = []
    monkeypatch.setattr(
        ImmediateExecutor, "enqueue", lambda self, job_id: dispatched.append(job_id)
    )
    return dispatched


@pytest.fixture(autouse=True)
def _forget_cached_snapshots():
    """SQLite hands out the ids of rolled-back rows again, so a snapshot that an earlier test
    left in the local-memory cache would pose as a new job's progress."""
    yield
    for cache in caches.all(initialized_only=True):
        cache.clear()


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user("alice", password="pw")


@pytest.fixture
def other_user(db):
    return get_user_model().objects.create_user("bob", password="pw")


@pytest.fixture
def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture(autouse=True)
def _forget_cached_snapshots():
    """SQLite reuses job ids across tests: a snapshot or cancel request a test left in the
    in-process cache store must not describe the next test's job with the same id."""
    yield
    from django.core.cache import caches

    caches["default"].clear()
