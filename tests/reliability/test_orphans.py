"""Jobs that outlive part of what they need: their job type (removed in a deploy), or their row
in the type's own table (deleted by SQL or a migration, without the job). They are shown,
cancelled, failed and deleted like any other, without the hooks that would need the type's
model; a worker that takes one fails it, saying why."""

from __future__ import annotations

import datetime
import logging

import pytest
from django.db import connection, models
from django.urls import reverse
from django.utils import timezone

from task_ferry import signals
from task_ferry.handler import JobHandler, transition
from task_ferry.models import ENDED_STATES, Job, JobState
from task_ferry.stores.base import get_store
from tests.api.helpers import client_for
from tests.reliability.helpers import hook_calls, start_lost_job, state_of
from tests.testapp.models import ScriptedJob
from tests.waiting import wait_for

pytestmark = pytest.mark.django_db

URL = "/api/jobs/"


def drop_own_row(job: Job) -> None:
    """Delete the job's row of ScriptedJob and leave its ``Job`` row, as raw SQL would."""
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {quote(ScriptedJob._meta.db_table)} "
            f"WHERE {quote(ScriptedJob._meta.pk.column)} = %s",
            [job.pk],
        )
    # A snapshot would answer polls without reading the row.
    get_store().delete([job.pk])


@pytest.fixture
def cancelled_signals():
    received = []

    def receiver(sender, job, **kwargs):
        received.append(job.pk)

    signals.job_cancelled.connect(receiver)
    yield received
    signals.job_cancelled.disconnect(receiver)


@pytest.mark.parametrize("through", ["handler", "api"])
def test_a_pending_job_of_a_removed_type_is_cancelled_without_an_error(
    queueing,
    user,
    retired_type,
    cancelled_signals,
    caplog,
    through,
    django_capture_on_commit_callbacks,
):
    job = JobHandler.create_and_start(user, "retired")
    retired_type()
    with (
        caplog.at_level(logging.WARNING, logger="task_ferry"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        if through == "handler":
            assert JobHandler.cancel(user, job.pk).state == JobState.CANCELLED
        else:
            response = client_for(user).post(f"{URL}{job.pk}/cancel/")
            assert response.status_code == 200
            assert response.json()["state"] == "cancelled"
    assert state_of(job) == "cancelled"
    assert cancelled_signals == [job.pk]
    assert "no job type 'retired' to run on_cancelled" in caplog.text


def test_cleanup_says_it_deletes_a_removed_types_jobs_without_before_delete(
    queueing, user, retired_type, caplog
):
    jobs = [JobHandler.create_and_start(user, "retired") for _ in range(3)]
    for job in jobs:
        assert transition(job, JobState.CANCELLED, from_states=[JobState.PENDING])
    long_ago = timezone.now() - datetime.timedelta(days=400)
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(finished_at=long_ago)
    retired_type()
    with caplog.at_level(logging.WARNING, logger="task_ferry"):
        assert JobHandler.cleanup_old_jobs() == 3
    assert caplog.messages == [
        "cleanup_old_jobs: no job type 'retired' to run before_delete of; deleting 3 of its "
        "expired jobs without it."
    ]


def test_a_job_without_its_row_of_the_types_model_is_shown_and_cancelled(
    queueing, user, admin_client, cancelled_signals, caplog, django_capture_on_commit_callbacks
):
    api = client_for(user)
    by_api, by_admin = (JobHandler.create_and_start(user, "scripted") for _ in range(2))
    for job in (by_api, by_admin):
        drop_own_row(job)

    assert JobHandler.get_job(user, by_api.pk).pk == by_api.pk
    detail = api.get(f"{URL}{by_api.pk}/")
    assert detail.status_code == 200
    assert detail.json()["state"] == "pending"
    with (
        caplog.at_level(logging.WARNING, logger="task_ferry"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        cancelled = api.post(f"{URL}{by_api.pk}/cancel/")
        admin = admin_client.post(
            reverse("admin:task_ferry_job_changelist"),
            {"action": "cancel_jobs", "_selected_action": [by_admin.pk]},
        )
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert admin.status_code == 302
    assert (state_of(by_api), state_of(by_admin)) == ("cancelled", "cancelled")
    assert sorted(cancelled_signals) == sorted([by_api.pk, by_admin.pk])
    # Its hook takes a ScriptedJob, which there is none of.
    assert hook_calls(by_api, "on_cancelled") == 0
    assert "has no row in ScriptedJob's table (testapp_scriptedjob)" in caplog.text


def test_a_default_manager_that_hides_the_row_does_not_orphan_the_job(queueing, user, monkeypatch):
    # A type's model may filter its default manager (soft deletion, say); the job's own row
    # is still there, and the job is still an instance of its type's model.
    class HidesEveryRow(models.Manager):
        def get_queryset(self):
            return super().get_queryset().none()

    hiding = HidesEveryRow()
    hiding.model, hiding.name = ScriptedJob, "hiding"
    job = JobHandler.create_and_start(user, "scripted", marker="ran")
    monkeypatch.setattr(ScriptedJob._meta, "default_manager", hiding)
    assert not ScriptedJob._default_manager.filter(pk=job.pk).exists()
    specific = Job.objects.get(pk=job.pk).specific
    assert isinstance(specific, ScriptedJob)
    assert specific.marker == "ran"


@pytest.mark.worker
def test_a_worker_fails_a_job_without_its_row_of_the_types_model_and_runs_the_next(
    queueing, processes, user
):
    orphan = JobHandler.create_and_start(user, "scripted", steps=2)
    drop_own_row(orphan)
    after = JobHandler.create_and_start(user, "scripted", steps=2)
    processes.worker()
    wait_for(lambda: {state_of(orphan), state_of(after)} <= set(ENDED_STATES), timeout=20)
    assert (state_of(orphan), state_of(after)) == ("failed", "finished")
    failed = Job.objects.get(pk=orphan.pk)
    assert failed.error.startswith(
        f"Job {orphan.pk} has no row in ScriptedJob's table (testapp_scriptedjob)"
    )
    assert "start it again" in failed.error
    assert get_store().read(orphan.pk)["state"] == "failed"


def test_the_sweep_fails_a_lost_job_without_its_row_with_the_rest_of_its_round(queueing, user):
    orphan, other = start_lost_job(user), start_lost_job(user)
    drop_own_row(orphan)
    assert JobHandler.sweep_stale_jobs() == 2
    assert (state_of(orphan), state_of(other)) == ("failed", "failed")
    assert (hook_calls(orphan, "on_error"), hook_calls(other, "on_error")) == (0, 1)


def test_cleanup_deletes_an_expired_job_without_its_row_of_the_types_model(queueing, user):
    orphan, other = (JobHandler.create_and_start(user, "scripted") for _ in range(2))
    long_ago = timezone.now() - datetime.timedelta(days=400)
    for job in (orphan, other):
        assert transition(job, JobState.CANCELLED, from_states=[JobState.PENDING])
    Job.objects.filter(pk__in=[orphan.pk, other.pk]).update(finished_at=long_ago)
    drop_own_row(orphan)
    assert JobHandler.cleanup_old_jobs() == 2
    assert not Job.objects.filter(pk__in=[orphan.pk, other.pk]).exists()
    assert (hook_calls(orphan, "before_delete"), hook_calls(other, "before_delete")) == (0, 1)
