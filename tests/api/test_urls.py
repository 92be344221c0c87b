"""The job API mounted the ways a project mounts its own API."""

import pytest
from django.test import Client

from tests.api.helpers import create, start
from tests.api.sse import parse_events

VERSIONED = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_VERSIONING_CLASS": "rest_framework.versioning.URLPathVersioning",
    "ALLOWED_VERSIONS": ["v1", "v2"],
}


@pytest.fixture
def versioned(settings):
    # DRF's APIView takes its classes from REST_FRAMEWORK when rest_framework.views is first
    # imported: not under this setting, or every later test's views would keep it.
    import rest_framework.views  # noqa: F401

    settings.REST_FRAMEWORK = VERSIONED


@pytest.mark.urls("tests.api.urls_versioned")
def test_every_endpoint_answers_under_a_prefix_with_a_version_argument(versioned, api, user, hold):
    # The version was handed to the views as an argument they did not take: a 500 each.
    job = start(create(user, steps=4), percentage=50)
    assert api.get("/api/v2/jobs/").json()["results"][0]["id"] == job.pk
    assert api.get(f"/api/v2/jobs/{job.pk}/").json()["progress_percentage"] == 50
    created = api.post("/api/v2/jobs/", {"type": "export_table", "table_id": 1}, format="json")
    assert created.status_code == 201
    assert api.post(f"/api/v2/jobs/{job.pk}/cancel/").status_code == 200


@pytest.mark.urls("tests.api.urls_versioned")
def test_the_event_stream_answers_under_a_prefix_with_a_version_argument(versioned, user, hold):
    client = Client()
    client.force_login(user)
    job = start(create(user, steps=4), percentage=50)
    response = client.get(f"/api/v1/jobs/{job.pk}/events/", HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    name, data = parse_events(response.content.decode())[1]
    assert (name, data["id"], data["progress_percentage"]) == ("job", job.pk, 50)
