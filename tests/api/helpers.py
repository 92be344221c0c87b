"""What the API tests share: clients, and jobs created and started as a request and a worker
would."""

import datetime

import pytest
from django.conf import settings
from django.test import TestCase
from django.utils import timezone
from rest_framework.test import APIClient

from task_ferry.handler import JobHandler, publish, transition
from task_ferry.models import JobState
from tests.registration import LinkedJobType

needs_redis = pytest.mark.skipif(
    not settings.TASK_FERRY.get("REDIS_URL"), reason="needs the Redis progress store"
)


class LinkedByApiJobType(LinkedJobType):
    """The handler tests' type with many-to-many fields (``markers``, and ``tags`` through a
    model of the project's), opted in to creation through the API."""

    api_create = True


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
