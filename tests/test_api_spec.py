"""The poll response and API cancel, as the README describes them."""

import datetime

from task_ferry.executors.immediate import ImmediateExecutor
from task_ferry.handler import JobHandler

SPEC_KEYS = {
    "id",
    "state",
    "progress_percentage",
    "progress_state",
    "error",
    "human_readable_error",
    "created_at",
    "updated_at",
}


def _parse(value):
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_poll_response_has_the_spec_keys_and_values(db, user, api):
    job = JobHandler.create_and_start(user, "export_table", table_id=3)
    response = api.get(f"/api/jobs/{job.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= SPEC_KEYS
    assert body["id"] == job.pk
    assert body["state"] == "finished"
    assert body["progress_percentage"] == 100
    assert body["progress_state"] == "Finalising"
    assert body["error"] == body["human_readable_error"] == ""
    assert _parse(body["created_at"]) <= _parse(body["updated_at"])
    assert "user_id" not in body and "traceback" not in body


def test_cancel_through_the_api(db, user, api, monkeypatch):
    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    response = api.post(f"/api/jobs/{job.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert api.get(f"/api/jobs/{job.pk}/").json()["state"] == "cancelled"
    job.refresh_from_db()
    assert job.state == "cancelled"


def test_other_users_job_is_not_found(db, user, other_user, api, monkeypatch):
    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(other_user, "export_table", table_id=1)
    assert api.get(f"/api/jobs/{job.pk}/").status_code == 404
    assert api.post(f"/api/jobs/{job.pk}/cancel/").status_code == 404
    assert api.get("/api/jobs/not-an-id/").status_code == 404
    job.refresh_from_db()
    assert job.state == "pending"
