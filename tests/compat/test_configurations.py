"""Projects configured unlike the test project: naive local datetimes (USE_TZ = False) in a
time zone three hours from UTC, and a user model whose primary key is a UUID not named
``id``. Run under tests/settings_compat.py by ``make test-compat``; skipped elsewhere."""

import datetime
import io
import json
import time
import uuid

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from task_ferry.exceptions import InvalidJobValues, MaxJobCountExceeded
from task_ferry.handler import JobHandler, publish, transition
from task_ferry.models import Heartbeat, Job, JobState
from task_ferry.snapshot import job_snapshot
from task_ferry.stores.base import get_store
from tests.gated import needs_concurrent_writers, start_halfway
from tests.myapp.models import ExportJob
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(
    settings.AUTH_USER_MODEL != "accounts.Account",
    reason="runs under tests.settings_compat (make test-compat)",
)

LIST_URL = "/api/jobs/"


def stamp(value):
    """A time as the API writes it: UTC with a Z where times are aware, naive local time as
    the database holds it where they are not."""
    if timezone.is_aware(value):
        return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
    return value.isoformat()


def ago(**age):
    return timezone.now() - datetime.timedelta(**age)


@pytest.fixture
def hold(no_dispatch):
    return no_dispatch


def export(user, **values):
    return JobHandler.create_and_start(user, "export_table", table_id=3, **values)


def test_the_configuration_is_the_one_under_test(user):
    assert settings.TIME_ZONE == "America/Sao_Paulo"
    assert isinstance(user.pk, uuid.UUID)
    assert get_user_model()._meta.pk.name == "account_uuid"


def test_the_readme_export_runs_to_the_end_and_the_api_shows_its_times(api, user):
    job = export(user)
    stored = ExportJob.objects.get(pk=job.pk)
    assert (stored.state, stored.output_path) == (JobState.FINISHED, "/exports/result.csv")
    assert timezone.is_aware(stored.created_at) == settings.USE_TZ
    assert abs(timezone.now() - stored.finished_at) < datetime.timedelta(minutes=1)

    detail = api.get(f"{LIST_URL}{job.pk}/").json()
    assert detail["state"] == "finished"
    assert detail["table_id"] == 3
    for name in ("created_at", "started_at", "finished_at"):
        assert detail[name] == stamp(getattr(stored, name)), name
    (listed,) = api.get(LIST_URL).json()["results"]
    assert listed["created_at"] == stamp(stored.created_at)


def test_a_running_jobs_live_progress_is_its_own_in_list_and_detail(api, user, hold):
    """The snapshot is matched to the job by created_at, read back from the database here."""
    job = export(user)
    assert transition(job, JobState.STARTED, from_states=[JobState.PENDING])
    job.progress_percentage = 40
    job.progress_state = "Writing row 12..."
    publish(job)

    (listed,) = api.get(LIST_URL).json()["results"]
    detail = api.get(f"{LIST_URL}{job.pk}/").json()
    for shown in (listed, detail):
        assert (shown["state"], shown["progress_percentage"]) == ("started", 40)
        assert shown["progress_state"] == "Writing row 12..."
        assert shown["created_at"] == stamp(Job.objects.get(pk=job.pk).created_at)
    assert detail["eta"] is not None


def test_a_snapshot_with_a_uuid_owner_is_json_and_only_its_owner_sees_it(
    api, user, other_user, hold
):
    job = export(user)
    snapshot = job_snapshot(job)
    assert json.loads(json.dumps(snapshot))["user_id"] == str(user.pk)
    publish(job)

    assert api.get(f"{LIST_URL}{job.pk}/").status_code == 200
    stranger = APIClient()
    stranger.force_authenticate(other_user)
    assert stranger.get(f"{LIST_URL}{job.pk}/").status_code == 404
    assert stranger.post(f"{LIST_URL}{job.pk}/cancel/").status_code == 404
    assert stranger.get(LIST_URL).json()["results"] == []


def test_cancel_through_the_api_ends_a_pending_job_and_asks_a_running_one(api, user, hold):
    pending = export(user)
    running = export(user)
    assert transition(running, JobState.STARTED, from_states=[JobState.PENDING])
    publish(running)

    cancelled = api.post(f"{LIST_URL}{pending.pk}/cancel/").json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["finished_at"] == stamp(Job.objects.get(pk=pending.pk).finished_at)
    assert api.post(f"{LIST_URL}{running.pk}/cancel/").json()["state"] == "started"
    assert get_store().is_cancel_requested(running.pk)


def test_create_through_the_api_and_max_count_lock_the_uuid_users_row(api, user, hold, monkeypatch):
    from tests.myapp.job_types import ExportJobType

    monkeypatch.setattr(ExportJobType, "api_create", True)
    created = api.post(LIST_URL, {"type": "export_table", "table_id": 1}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["created_at"] == stamp(Job.objects.get().created_at)
    JobHandler.create_and_start(user, "export_table", table_id=2)
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start(user, "export_table", table_id=3)
    assert (
        api.post(LIST_URL, {"type": "export_table", "table_id": 4}, format="json").status_code
        == 429
    )
    assert Job.objects.for_user(user).count() == 2


def test_create_many_counts_against_max_count_per_uuid_user(user, other_user, hold):
    jobs = JobHandler.create_and_start_many(
        user, "export_table", [{"table_id": 1}, {"table_id": 2}]
    )
    assert [j.user_id for j in jobs] == [user.pk, user.pk]
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start_many(
            other_user, "export_table", [{"table_id": i} for i in range(3)]
        )
    assert list(Job.objects.for_user(user).order_by("pk").values_list("pk", flat=True)) == [
        j.pk for j in jobs
    ]


def test_an_unsaved_user_whose_key_is_filled_in_is_told_to_save_it(db):
    unsaved = get_user_model()(username="unsaved")
    assert unsaved.pk is not None
    with pytest.raises(InvalidJobValues, match="Save the user"):
        JobHandler.create_and_start(unsaved, "export_table", table_id=1)
    assert not Job.objects.exists()


def started_with_beat(user, beat_at):
    job = export(user)
    assert transition(job, JobState.STARTED, from_states=[JobState.PENDING])
    Job.objects.filter(pk=job.pk).update(started_at=beat_at)
    Heartbeat.objects.create(job_id=job.pk, worker="w:1", beat_at=beat_at)
    return job


def test_the_sweep_fails_a_job_whose_heartbeat_lapsed_and_keeps_a_beating_one(user, hold, settings):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_TIMEOUT": 60}
    lapsed = started_with_beat(user, ago(seconds=90))
    beating = started_with_beat(user, ago(seconds=30))
    assert JobHandler.sweep_stale_jobs() == 1
    assert Job.objects.get(pk=lapsed.pk).state == JobState.FAILED
    assert Job.objects.get(pk=beating.pk).state == JobState.STARTED


@needs_concurrent_writers
def test_a_running_jobs_heartbeats_keep_it_from_the_sweep(
    transactional_db,
    user,
    gated,
    settings,
):
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "HEARTBEAT_INTERVAL": 0.1,
        "HEARTBEAT_TIMEOUT": 1,
    }
    thread, job = start_halfway(gated, user, steps=4)
    wait_for(lambda: Heartbeat.objects.filter(job_id=job.pk).exists(), what="a heartbeat")
    # Past HEARTBEAT_TIMEOUT since the job started: only its heartbeats keep it alive.
    time.sleep(1.5)
    beat_at = Heartbeat.objects.get(job_id=job.pk).beat_at
    assert timezone.is_aware(beat_at) == settings.USE_TZ
    assert abs(timezone.now() - beat_at) < datetime.timedelta(seconds=1)
    assert JobHandler.sweep_stale_jobs() == 0
    gated.release.set()
    thread.finish()
    assert Job.objects.get(pk=job.pk).state == JobState.FINISHED


@pytest.mark.skipif(settings.USE_TZ, reason="aware datetimes do not jump")
def test_a_heartbeat_from_before_the_clocks_went_forward_is_not_an_hour_old(
    user, hold, settings, monkeypatch
):
    """Sao Paulo went from 00:00 to 01:00 on 4 November 2018: naive local time jumped an hour."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_TIMEOUT": 60}
    # 40 and 100 seconds before the sweep, in real time.
    beating = started_with_beat(user, datetime.datetime(2018, 11, 3, 23, 59, 50))
    lapsed = started_with_beat(user, datetime.datetime(2018, 11, 3, 23, 58, 50))
    monkeypatch.setattr(timezone, "now", lambda: datetime.datetime(2018, 11, 4, 1, 0, 30))
    assert JobHandler.sweep_stale_jobs() == 1
    assert Job.objects.get(pk=beating.pk).state == JobState.STARTED
    assert Job.objects.get(pk=lapsed.pk).state == JobState.FAILED


def finished(user, **age):
    job = export(user)
    Job.objects.filter(pk=job.pk).update(state=JobState.FINISHED, finished_at=ago(**age))
    return job


def test_cleanup_deletes_the_jobs_older_than_the_age_and_keeps_the_rest(user, hold):
    old = finished(user, days=7, minutes=5)
    young = finished(user, days=6, hours=23)
    assert JobHandler.cleanup_old_jobs(older_than=datetime.timedelta(days=7)) == 1
    assert list(Job.objects.values_list("pk", flat=True)) == [young.pk]
    assert not Job.objects.filter(pk=old.pk).exists()


def test_the_cleanup_command_names_the_zone_of_its_times(user, hold):
    job = finished(user, days=8)
    out = io.StringIO()
    call_command("task_ferry_cleanup", "--dry-run", "-v", "2", stdout=out)
    text = out.getvalue()
    finished_at = Job.objects.get(pk=job.pk).finished_at
    zone = "UTC" if settings.USE_TZ else "-03"
    assert f"#{job.pk} export_table finished at {finished_at:%Y-%m-%d %H:%M:%S} {zone}\n" in text
    assert "  (" not in text.splitlines()[0]


def test_the_jobs_command_and_the_admin_show_and_cancel_a_uuid_owners_job(admin_client, user, hold):
    job = export(user)
    assert transition(job, JobState.STARTED, from_states=[JobState.PENDING])
    Job.objects.filter(pk=job.pk).update(started_at=ago(seconds=75))
    out = io.StringIO()
    call_command("task_ferry_jobs", stdout=out)
    assert f"#{job.pk} export_table alice started 0% (1:15)" in out.getvalue()

    changelist = reverse("admin:task_ferry_job_changelist")
    response = admin_client.get(changelist, {"q": "alic"})
    assert [j.pk for j in response.context["cl"].result_list] == [job.pk]
    assert (
        admin_client.get(reverse("admin:task_ferry_job_change", args=[job.pk])).status_code == 200
    )
    response = admin_client.post(
        changelist, {"action": "cancel_jobs", "_selected_action": [job.pk]}, follow=True
    )
    assert response.status_code == 200
    assert get_store().is_cancel_requested(job.pk)
