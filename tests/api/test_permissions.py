"""Who sees and cancels what: 404 for anything not yours, staff by a permission class, CSRF."""

import pytest
from rest_framework.authentication import BasicAuthentication
from rest_framework.test import APIClient

from task_ferry.api.events import JobEventsAccess
from task_ferry.api.permissions import IsJobOwner
from task_ferry.api.views import JobViewSet
from task_ferry.models import Job
from tests.api.helpers import client_for, create, start

URL = "/api/jobs/"
STAFF_SEES_ALL = "task_ferry.api.permissions.IsJobOwnerOrStaff"


def staff_policy(settings):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "API_PERMISSION_CLASS": STAFF_SEES_ALL}


class NoCancel(IsJobOwner):
    def can_cancel(self, request, job):
        return False


class OnlyScripted(IsJobOwner):
    def can_create(self, request, job_type):
        return job_type.type == "scripted"


class DeletedMeanwhile(IsJobOwner):
    """Asked about a job read a moment ago, which someone else deletes now."""

    def can_cancel(self, request, job):
        Job.objects.filter(pk=job.pk).delete()
        return True


class NoScriptedJobs(IsJobOwner):
    """A rule by type: visible_jobs() alone, as a project writes it first."""

    def visible_jobs(self, request, queryset):
        return super().visible_jobs(request, queryset).exclude(type="scripted")


@pytest.fixture
def foreign_jobs(other_user, hold):
    """Someone else's job (live in the store) and a system job, both pending."""
    return start(create(other_user, steps=5)), create(None, steps=5)


def test_someone_elses_job_and_a_system_job_are_404(api, foreign_jobs):
    for job in foreign_jobs:
        for response in (
            api.get(f"{URL}{job.pk}/"),
            api.post(f"{URL}{job.pk}/cancel/"),
            api.get(f"{URL}{job.pk}/events/"),
        ):
            assert response.status_code == 404
    assert {j.state for j in Job.objects.all()} == {"started", "pending"}
    assert api.get(URL).json()["count"] == 0


def test_404_for_a_foreign_job_looks_like_404_for_no_job(api, foreign_jobs):
    taken = foreign_jobs[0].pk
    missing = max(j.pk for j in foreign_jobs) + 1000
    foreign = api.get(f"{URL}{taken}/").json()["detail"]
    absent = api.get(f"{URL}{missing}/").json()["detail"]
    assert foreign.replace(str(taken), "N") == absent.replace(str(missing), "N")


@pytest.mark.parametrize("bad_id", ["abc", "0", "-3", "1.5", "99999999999999999999999", "1e3"])
def test_a_malformed_id_is_404(api, user, bad_id):
    assert api.get(f"{URL}{bad_id}/").status_code == 404
    assert api.post(f"{URL}{bad_id}/cancel/").status_code == 404
    assert api.get(f"{URL}{bad_id}/events/").status_code == 404


@pytest.mark.parametrize("prefix", ["+", "0", "%20"])
def test_an_own_jobs_id_in_another_spelling_is_404(api, user, prefix):
    # int() takes "+5", "05" and " 5"; ids in URLs are plain digits.
    job = create(user, steps=1)
    assert api.get(f"{URL}{job.pk}/").status_code == 200
    assert api.get(f"{URL}{prefix}{job.pk}/").status_code == 404
    assert api.post(f"{URL}{prefix}{job.pk}/cancel/").status_code == 404
    assert api.get(f"{URL}{prefix}{job.pk}/events/").status_code == 404


def test_staff_see_only_their_own_jobs_by_default(staff, foreign_jobs):
    client = client_for(staff)
    for job in foreign_jobs:
        assert client.get(f"{URL}{job.pk}/").status_code == 404
        assert client.post(f"{URL}{job.pk}/cancel/").status_code == 404
    assert client.get(URL).json()["count"] == 0


def test_with_the_staff_permission_class_staff_see_and_cancel_every_job(
    staff, api, foreign_jobs, settings, store
):
    staff_policy(settings)
    client = client_for(staff)
    listed = {j["id"] for j in client.get(URL).json()["results"]}
    assert listed == {j.pk for j in foreign_jobs}
    for job in foreign_jobs:
        assert client.get(f"{URL}{job.pk}/").status_code == 200
        assert client.get(f"{URL}{job.pk}/events/").status_code == 200
    running, system = foreign_jobs
    assert client.post(f"{URL}{system.pk}/cancel/").json()["state"] == "cancelled"
    assert client.post(f"{URL}{running.pk}/cancel/").status_code == 200
    assert store.is_cancel_requested(running.pk)
    # Non-staff users are unaffected.
    assert api.get(f"{URL}{running.pk}/").status_code == 404
    assert api.get(URL).json()["count"] == 0


def test_a_rule_of_visible_jobs_hides_live_jobs_answered_from_the_store_too(
    api, user, settings, hold, django_assert_max_num_queries
):
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "API_PERMISSION_CLASS": f"{__name__}.NoScriptedJobs",
    }
    # Started and published: its detail and its event stream were answered from the store,
    # judged by can_view() (the owner) alone, and showed what the list hides.
    hidden = start(create(user, steps=5), percentage=40)
    shown = start(create(user, "export_table", table_id=1))
    assert [j["id"] for j in api.get(URL).json()["results"]] == [shown.pk]
    assert api.get(f"{URL}{hidden.pk}/").status_code == 404
    assert api.get(f"{URL}{hidden.pk}/events/").status_code == 404
    assert api.post(f"{URL}{hidden.pk}/cancel/").status_code == 404
    # What it costs such a class: one query a poll.
    with django_assert_max_num_queries(1):
        assert api.get(f"{URL}{shown.pk}/").json()["state"] == "started"
    assert Job.objects.get(pk=hidden.pk).state == "started"


def test_cancelling_a_job_deleted_while_the_request_ran_is_404(api, user, settings, hold):
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "API_PERMISSION_CLASS": f"{__name__}.DeletedMeanwhile",
    }
    job = create(user, steps=1)
    response = api.post(f"{URL}{job.pk}/cancel/")
    assert response.status_code == 404
    assert response.json() == api.get(f"{URL}{job.pk}/").json()


def test_a_permission_subclass_can_forbid_cancelling(api, user, settings, hold):
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "API_PERMISSION_CLASS": f"{__name__}.NoCancel",
    }
    job = create(user, steps=1)
    assert api.get(f"{URL}{job.pk}/").status_code == 200
    assert api.post(f"{URL}{job.pk}/cancel/").status_code == 404
    assert Job.objects.get(pk=job.pk).state == "pending"


def test_a_permission_subclass_can_limit_the_types_a_user_creates(api, user, settings, caplog):
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "API_PERMISSION_CLASS": f"{__name__}.OnlyScripted",
    }
    with caplog.at_level("INFO", logger="task_ferry"):
        response = api.post(URL, {"type": "export_table", "table_id": 1}, format="json")
    assert response.status_code == 400
    assert response.json() == {
        "type": [
            "No job type named 'export_table'. Known job types: 'scripted'. Job types opt in "
            "to this API with api_create = True."
        ]
    }
    # The project's own choice: told at INFO, not warned about.
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "task_ferry"] == [
        (
            "INFO",
            f"POST {URL}: job type 'export_table' sets api_create = True, but "
            f"OnlyScripted.can_create refused it to user {user.pk}.",
        )
    ]
    assert api.post(URL, {"type": "scripted", "steps": 1}, format="json").status_code == 201


def test_unauthenticated_requests_are_refused(user, hold):
    job = create(user, steps=1)
    anonymous = APIClient()
    for response in (
        anonymous.get(URL),
        anonymous.post(URL, {"type": "scripted"}, format="json"),
        anonymous.get(f"{URL}{job.pk}/"),
        anonymous.post(f"{URL}{job.pk}/cancel/"),
        anonymous.get(f"{URL}{job.pk}/events/"),
    ):
        assert response.status_code == 403
        assert response.json() == {"detail": "Authentication credentials were not provided."}
    assert Job.objects.get(pk=job.pk).state == "pending"
    assert Job.objects.count() == 1


def test_unauthenticated_requests_get_401_with_a_challenging_authenticator(user, hold, monkeypatch):
    # As with DEFAULT_AUTHENTICATION_CLASSES = [BasicAuthentication] at start-up.
    for view in (JobViewSet, JobEventsAccess):
        monkeypatch.setattr(view, "authentication_classes", [BasicAuthentication])
    job = create(user, steps=1)
    anonymous = APIClient()
    for response in (anonymous.get(f"{URL}{job.pk}/"), anonymous.get(f"{URL}{job.pk}/events/")):
        assert response.status_code == 401
        assert response["WWW-Authenticate"].startswith("Basic")
    basic = APIClient()
    basic.credentials(HTTP_AUTHORIZATION="Basic YWxpY2U6cHc=")  # alice:pw
    assert basic.get(f"{URL}{job.pk}/").status_code == 200


def test_session_writes_need_the_csrf_token(user, hold):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    job = create(user, steps=1)
    assert client.post(URL, {"type": "scripted"}, format="json").status_code == 403
    assert client.post(f"{URL}{job.pk}/cancel/").status_code == 403
    assert Job.objects.count() == 1 and Job.objects.get().state == "pending"

    token = (
        client.get(URL).cookies.get("csrftoken") or client.get("/admin/login/").cookies["csrftoken"]
    )
    headers = {"HTTP_X_CSRFTOKEN": token.value}
    assert client.post(URL, {"type": "scripted"}, format="json", **headers).status_code == 201
    response = client.post(f"{URL}{job.pk}/cancel/", **headers)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"


def test_error_shows_no_traceback_or_path_but_the_row_keeps_them(api, user, monkeypatch):
    from tests.testapp.job_types import ScriptedJobType

    def run(self, job, progress):
        open("/srv/app/secret/config.yaml")  # noqa: SIM115 - the failure is the point

    monkeypatch.setattr(ScriptedJobType, "run", run)
    body = api.post(URL, {"type": "scripted"}, format="json").json()
    assert body["state"] == "failed"
    for text in (body["error"], api.get(f"{URL}{body['id']}/").json()["error"]):
        assert text.startswith("FileNotFoundError")
        assert "/srv" not in text and "secret" not in text and "Traceback" not in text
    job = Job.objects.get(pk=body["id"])
    assert "/srv/app/secret/config.yaml" in job.error
    assert "Traceback (most recent call last)" in job.traceback
    listed = api.get(URL).json()["results"][0]
    assert listed["error"] == body["error"]


def test_error_shows_no_credentials_from_the_exception_but_the_row_keeps_them(
    api, user, monkeypatch
):
    from tests.testapp.job_types import ScriptedJobType

    def run(self, job, progress):
        raise ConnectionError(
            "Could not reach postgres://shop:hunter2@db.internal:5432/shop, then "
            "https://api.example.com/v1/charge?api_key=sk_live_42&amount=5"
        )

    monkeypatch.setattr(ScriptedJobType, "run", run)
    body = api.post(URL, {"type": "scripted"}, format="json").json()
    assert body["state"] == "failed"
    for text in (body["error"], api.get(f"{URL}{body['id']}/").json()["error"]):
        assert text.startswith("ConnectionError: Could not reach postgres://shop:***@db.internal")
        assert "hunter2" not in text and "sk_live_42" not in text
        assert "api_key=***" in text
    assert "hunter2" in Job.objects.get(pk=body["id"]).error
