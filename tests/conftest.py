import sys

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import caches
from django.db import connection
from rest_framework.test import APIClient

from tests.redis_server import RedisServer


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
def _forget_snapshots():
    """SQLite hands out the ids of rolled-back rows again, so a snapshot or cancel request that
    an earlier test left in the store would describe the next test's job with the same id."""
    yield
    for cache in caches.all(initialized_only=True):
        cache.clear()
    ferry = settings.TASK_FERRY
    if connection.vendor == "sqlite" and ferry.get("REDIS_URL"):
        client = redis.Redis.from_url(ferry["REDIS_URL"])
        keys = list(client.scan_iter(f"{ferry['KEY_PREFIX']}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def redis_server(tmp_path, settings):
    """A redis-server of the test's own as the progress store (tests/reliability's fixture of
    this name starts the same server and leaves the settings to each test)."""
    server = RedisServer(tmp_path)
    server.start()
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "REDIS_URL": server.url,
        "PROGRESS_STORE": "task_ferry.stores.redis.RedisProgressStore",
    }
    yield server
    server.stop()


@pytest.fixture
def gated():
    """The job type of tests/gated.py, registered for the test; its jobs are let go at the end."""
    from task_ferry.registry import job_type_registry
    from tests.gated import GatedJobType

    job_type = job_type_registry.register(GatedJobType())
    yield job_type
    job_type.release.set()
    job_type_registry.unregister(job_type)
