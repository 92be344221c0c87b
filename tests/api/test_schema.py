"""The OpenAPI schema (drf-spectacular, optional) and a schemathesis run against a live server."""

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from rest_framework import serializers
from rest_framework.test import APIClient

from task_ferry.api.permissions import IsJobOwner
from tests.api.helpers import create, start
from tests.api.live import ROOT, session_headers, uvicorn_server
from tests.testapp.models import LimitedJob

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("drf_spectacular")

SCHEMA_URL = "/api/jobs/schema/?format=json"


@pytest.fixture
def schema(api):
    response = api.get(SCHEMA_URL)
    assert response.status_code == 200
    return response.json()


def test_schema_has_one_component_per_job_type_with_its_fields(schema):
    components = schema["components"]["schemas"]
    export = components["ExportTableJob"]["properties"]
    assert {"id", "type", "state", "progress_percentage", "eta", "table_id", "output_path"} <= set(
        export
    )
    assert "steps" not in export
    assert {"steps", "tick_delay", "fail_at", "result"} <= set(
        components["ScriptedJob"]["properties"]
    )
    assert components["ExportTableJobCreate"]["required"] == ["table_id", "type"]
    assert "id" not in components["ExportTableJobCreate"]["properties"]


def test_a_types_many_to_many_fields_are_described_as_lists_of_keys(api, linked_by_api):
    # They were left out; a read-only one (through a model of the project's) failed the schema.
    components = api.get(SCHEMA_URL).json()["components"]["schemas"]
    keys = {"type": "array", "items": {"type": "integer"}}
    shown = components["LinkedJob"]["properties"]
    assert (shown["markers"], shown["tags"]) == (keys, {**keys, "readOnly": True})
    taken = components["LinkedJobCreate"]["properties"]
    assert taken["markers"] == keys
    assert "tags" not in taken


def test_a_types_method_fields_have_the_types_their_methods_give(api, user, monkeypatch, capsys):
    from drf_spectacular.utils import extend_schema_field

    from tests.testapp.job_types import LimitedJobType

    class LabelShapeSerializer(serializers.ModelSerializer):
        label_length = serializers.SerializerMethodField()
        label_words = serializers.SerializerMethodField(method_name="words_of")

        class Meta:
            model = LimitedJob
            fields = ["label", "label_length", "label_words"]

        def get_label_length(self, job) -> int:
            return len(job.label)

        @extend_schema_field({"type": "array", "items": {"type": "string"}})
        def words_of(self, job):
            return job.label.split()

    monkeypatch.setattr(LimitedJobType, "serializer_class", LabelShapeSerializer)
    job = create(user, "limited", label="two words")
    assert api.get(f"/api/jobs/{job.pk}/").json()["label_words"] == ["two", "words"]
    capsys.readouterr()

    shown = api.get(SCHEMA_URL).json()["components"]["schemas"]["LimitedJob"]["properties"]
    # Both were strings, and spectacular said the methods were missing.
    assert shown["label_length"] == {"type": "integer", "readOnly": True}
    assert shown["label_words"] == {
        "type": "array",
        "items": {"type": "string"},
        "readOnly": True,
    }
    assert capsys.readouterr().err == ""


def test_the_event_stream_is_described_like_the_detail_it_mirrors(schema):
    detail = schema["paths"]["/api/jobs/{id}/"]["get"]
    events = schema["paths"]["/api/jobs/{id}/events/"]["get"]
    assert events["operationId"] == "jobs_events_retrieve"
    assert list(events["responses"]["200"]["content"]) == ["text/event-stream"]
    assert "event: end" in events["responses"]["200"]["content"]["text/event-stream"]["example"]
    assert events["parameters"] == detail["parameters"]
    assert events["security"] == detail["security"]
    assert {code: events["responses"][code] for code in ("401", "403", "404")} == {
        code: detail["responses"][code] for code in ("401", "403", "404")
    }


def test_job_responses_and_create_requests_are_one_of_the_types(schema):
    components = schema["components"]["schemas"]
    job = components["Job"]
    assert job["discriminator"]["propertyName"] == "type"
    assert job["discriminator"]["mapping"] == {
        "autocommit": "#/components/schemas/AutocommitJob",
        "export_table": "#/components/schemas/ExportTableJob",
        "limited": "#/components/schemas/LimitedJob",
        "routed": "#/components/schemas/RoutedJob",
        "scripted": "#/components/schemas/ScriptedJob",
        "time_limited": "#/components/schemas/TimeLimitedJob",
    }
    create = schema["paths"]["/api/jobs/"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobCreate"}
    assert set(create["responses"]) == {"201", "400", "401", "403", "406", "415", "429"}
    detail = schema["paths"]["/api/jobs/{id}/"]["get"]["responses"]["200"]
    assert detail["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Job"}
    filters = {p["name"]: p for p in schema["paths"]["/api/jobs/"]["get"]["parameters"]}
    assert filters["type"]["schema"]["items"]["enum"] == [
        "autocommit",
        "export_table",
        "limited",
        "routed",
        "scripted",
        "time_limited",
    ]
    assert "no longer registered is accepted" in filters["type"]["description"]
    assert {"limit", "offset", "state"} <= set(filters)


class StaffOnly(IsJobOwner):
    def has_permission(self, request, view):
        return super().has_permission(request, view) and request.user.is_staff


def test_the_schema_is_refused_to_whom_the_api_refuses(api, settings):
    assert APIClient().get(SCHEMA_URL).status_code == 403
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "API_PERMISSION_CLASS": "tests.api.test_schema.StaffOnly",
    }
    assert api.get("/api/jobs/").status_code == 403
    assert api.get(SCHEMA_URL).status_code == 403


def test_the_api_works_without_drf_spectacular_installed(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        sys.modules["drf_spectacular"] = None  # as if it were not installed
        import django
        django.setup()
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from rest_framework.test import APIClient

        call_command("migrate", verbosity=0)
        client = APIClient()
        client.force_authenticate(get_user_model().objects.create_user("u"))
        created = client.post("/api/jobs/", {"type": "scripted", "steps": 2}, format="json")
        assert created.status_code == 201, created.content
        assert client.get("/api/jobs/").json()["count"] == 1
        assert client.get("/api/jobs/schema/").status_code == 404
        assert "drf_spectacular.views" not in sys.modules
        print("ok")
        """
    )
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASK_FERRY_TEST_DB="sqlite",
        TASK_FERRY_TEST_STORE="cache",
        TASK_FERRY_TEST_SQLITE=str(tmp_path / "db.sqlite3"),
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
EXAMPLES_PER_OPERATION_AND_MODE = 60


@pytest.mark.worker
def test_schemathesis_finds_no_server_error_or_schema_violation(transactional_db, hold):
    """Every operation, with valid and with invalid inputs, against uvicorn over loopback."""
    from django.contrib.auth import get_user_model
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks

    owner = get_user_model().objects.create_user("schemathesis")
    headers = session_headers(owner)
    # The caller's own jobs, so detail and cancel answer 200 too (from store and database).
    running = start(create(owner, steps=8), percentage=40, started_ago=5)
    own_jobs = [running, create(owner, "export_table", table_id=3), create(owner, steps=1)]
    selected = [not_a_server_error] + [getattr(checks, name) for name in CHECK_NAMES[1:]]
    cases: dict[str, int] = {}

    def run_cases(operation, label, max_examples, **strategy_kwargs):
        @given(case=operation.as_strategy(**strategy_kwargs))
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            cases[label] = cases.get(label, 0) + 1
            case.call_and_validate(base_url=base, headers=headers, checks=selected)

        run()

    with uvicorn_server() as base:
        schema = schemathesis.openapi.from_url(base + SCHEMA_URL, headers=headers)
        # The event stream stays open while its job lives: not something to fuzz.
        operations = [
            result.ok()
            for result in schema.get_all_operations()
            if not result.ok().path.endswith("/events/")
        ]
        assert len(operations) == 4
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run_cases(
                    operation,
                    f"{operation.label} ({mode.value})",
                    EXAMPLES_PER_OPERATION_AND_MODE,
                    generation_mode=mode,
                )
        for job in own_jobs:
            for operation in operations:
                if "{id}" in operation.path:
                    run_cases(
                        operation,
                        f"{operation.label} (job {job.pk}, {job.type})",
                        10,
                        path_parameters={"id": job.pk},
                    )
    print(f"\nschemathesis: {sum(cases.values())} cases", cases)
    assert all(count >= 10 for count in cases.values()), cases


def test_a_project_wide_schema_gets_the_event_stream_from_the_hook(db):
    # Spectacular cannot see the stream (a plain Django view): the hook describes it.
    assert "/api/jobs/{id}/events/" not in project_schema(POSTPROCESSING_HOOKS=[])["paths"]
    events = project_schema()["paths"]["/api/jobs/{id}/events/"]["get"]
    assert events["operationId"] == "jobs_events_retrieve"
    assert list(events["responses"]["200"]["content"]) == ["text/event-stream"]


def test_the_create_request_lists_only_the_types_that_opt_in(api, monkeypatch):
    from tests.myapp.job_types import ExportJobType

    monkeypatch.setattr(ExportJobType, "api_create", False)
    components = api.get(SCHEMA_URL).json()["components"]["schemas"]
    assert set(components["JobCreate"]["discriminator"]["mapping"]) == {
        "autocommit",
        "limited",
        "routed",
        "scripted",
        "time_limited",
    }
    # Responses still describe every type.
    assert "export_table" in components["Job"]["discriminator"]["mapping"]


def test_with_no_type_open_to_the_api_the_schema_has_no_create(api, monkeypatch):
    from task_ferry.registry import job_type_registry

    for job_type in job_type_registry:
        monkeypatch.setattr(type(job_type), "api_create", False)
    schema = api.get(SCHEMA_URL).json()
    assert set(schema["paths"]["/api/jobs/"]) == {"get"}
    assert "JobCreate" not in schema["components"]["schemas"]


def test_the_page_parameters_carry_the_ranges_the_list_takes(schema):
    # Without them a client could send limit=0 or offset=-1 by the schema, and get a 400.
    parameters = {p["name"]: p for p in schema["paths"]["/api/jobs/"]["get"]["parameters"]}
    assert parameters["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 200}
    assert parameters["offset"]["schema"] == {"type": "integer", "minimum": 0, "maximum": 2**62}


def test_a_create_body_takes_no_other_keys_unless_the_type_has_its_own_prepare_values(schema):
    # Other keys go to prepare_values, which must return model fields: JobType's own returns
    # them untouched, so they are refused with "Unknown field.", as the schema now says.
    components = schema["components"]["schemas"]
    for name in ("ScriptedJobCreate", "RoutedJobCreate", "LimitedJobCreate"):
        assert components[name]["additionalProperties"] is False, name
    # ExportJobType has a prepare_values, which may turn other inputs into its fields.
    assert "additionalProperties" not in components["ExportTableJobCreate"]
    assert "additionalProperties" not in components["ScriptedJob"]


def test_the_create_request_body_is_required(schema):
    # A POST without one is answered 400 ("type": "This field is required.").
    assert schema["paths"]["/api/jobs/"]["post"]["requestBody"]["required"] is True


def test_the_cancel_operation_lists_the_answers_it_gives(schema):
    # A cancel while the progress store is down is recorded in the database and answered 200:
    # the 503 the schema listed for it was never sent.
    responses = schema["paths"]["/api/jobs/{id}/cancel/"]["post"]["responses"]
    assert set(responses) == {"200", "401", "403", "404", "406"}


def test_the_post_operations_say_their_403_may_be_a_missing_csrf_token(schema, session_api):
    # Session authentication answers such a POST 403, which the schema called "Not
    # authenticated" alone.
    session_api.handler.enforce_csrf_checks = True
    response = session_api.post("/api/jobs/", {"type": "scripted"}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    for path in ("/api/jobs/", "/api/jobs/{id}/cancel/"):
        assert "CSRF token" in schema["paths"][path]["post"]["responses"]["403"]["description"]
    assert "CSRF" not in schema["paths"]["/api/jobs/"]["get"]["responses"]["403"]["description"]


def test_the_operations_list_the_406_and_415_they_answer(schema, api, user, hold):
    job = create(user, steps=1)
    paths = schema["paths"]
    refusals = {
        ("get", "/api/jobs/"): api.get("/api/jobs/", HTTP_ACCEPT="text/csv"),
        ("post", "/api/jobs/"): api.post(
            "/api/jobs/", {"type": "scripted"}, format="json", HTTP_ACCEPT="text/csv"
        ),
        ("get", "/api/jobs/{id}/"): api.get(f"/api/jobs/{job.pk}/", HTTP_ACCEPT="text/csv"),
        ("post", "/api/jobs/{id}/cancel/"): api.post(
            f"/api/jobs/{job.pk}/cancel/", HTTP_ACCEPT="text/csv"
        ),
    }
    # They were sent, and the schema listed neither.
    for (method, path), response in refusals.items():
        assert response.status_code == 406, (method, path)
        assert "Accept" in response.json()["detail"]
        assert "406" in paths[path][method]["responses"], (method, path)
    response = api.post("/api/jobs/", "type=scripted", content_type="text/plain")
    assert response.status_code == 415
    assert "415" in paths["/api/jobs/"]["post"]["responses"]
    # Cancel reads no body, and the event stream (a plain Django view) no Accept header.
    response = api.post(f"/api/jobs/{job.pk}/cancel/", "x", content_type="text/plain")
    assert response.status_code == 200
    assert "415" not in paths["/api/jobs/{id}/cancel/"]["post"]["responses"]
    response = api.get(f"/api/jobs/{job.pk}/events/", HTTP_ACCEPT="text/csv")
    assert response.status_code == 200
    assert "406" not in paths["/api/jobs/{id}/events/"]["get"]["responses"]


def test_a_job_objects_keys_are_all_required_as_every_response_has_them(api, user, linked_by_api):
    components = api.get(SCHEMA_URL).json()["components"]["schemas"]
    # Fields with a model default (output_path, the many-to-many markers) were optional.
    assert {"output_path", "table_id"} <= set(components["ExportTableJob"]["required"])
    jobs = {
        "ExportTableJob": create(user, "export_table", table_id=3),
        "ScriptedJob": create(user, steps=1),
        "LinkedJob": create(user, "linked"),
    }
    for name, job in jobs.items():
        component = components[name]
        assert sorted(component["required"]) == sorted(component["properties"]), name
        assert set(api.get(f"/api/jobs/{job.pk}/").json()) == set(component["properties"]), name
    # A create body still requires only what the serializer does.
    assert components["ExportTableJobCreate"]["required"] == ["table_id", "type"]


PROJECT_HOOKS = [
    "drf_spectacular.hooks.postprocess_schema_enums",
    "task_ferry.api.schema.events_postprocessing_hook",
]


def project_schema(**spectacular_settings):
    """The project-wide schema spectacular generates, with the job API's hook among its
    ``POSTPROCESSING_HOOKS`` as docs/api.md adds it."""
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.settings import patched_settings

    class ProjectSchemaGenerator(SchemaGenerator):
        def _get_paths_and_endpoints(self):
            # The job API's own schema view takes DRF's DEFAULT_SCHEMA_CLASS, which the test
            # project leaves as DRF's, not spectacular's as a project using spectacular sets it.
            endpoints = super()._get_paths_and_endpoints()
            return [e for e in endpoints if not e[0].endswith("/schema/")]

    with patched_settings({"POSTPROCESSING_HOOKS": PROJECT_HOOKS, **spectacular_settings}):
        return ProjectSchemaGenerator().get_schema(request=None, public=True)


@pytest.mark.urls("tests.api.urls_nested")
def test_the_hook_describes_the_stream_of_an_api_inside_a_namespace_of_the_projects(db):
    # It looked the stream up as task_ferry:job-events, which is api:task_ferry:job-events
    # here, and left it out without a word.
    paths = project_schema()["paths"]
    assert "/api/v2/jobs/{id}/events/" in paths


@pytest.mark.urls("tests.api.urls_versioned")
def test_the_hook_describes_the_stream_of_an_api_under_a_prefix_with_a_version_argument(db):
    paths = project_schema()["paths"]
    events = paths["/api/{version}/jobs/{id}/events/"]["get"]
    assert events["parameters"] == paths["/api/{version}/jobs/{id}/"]["get"]["parameters"]


@pytest.mark.urls("tests.api.urls_nested")
def test_the_apis_own_schema_inside_a_namespace_describes_the_stream(api):
    paths = api.get("/api/v2/jobs/schema/?format=json").json()["paths"]
    assert "/api/v2/jobs/{id}/events/" in paths


@pytest.mark.urls("tests.api.urls_own_jobs")
def test_the_hook_describes_the_stream_of_the_job_api_only(db, settings):
    # The project's own jobs/{id}/ has the job detail's operation id too (until spectacular
    # suffixes one of them, after the hooks), and got a stream.
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    }
    paths = project_schema()["paths"]
    assert paths["/jobs/{id}/"]["get"]["operationId"].startswith("jobs_retrieve")
    assert "/jobs/{id}/events/" not in paths
    events = paths["/api/tasks/{id}/events/"]["get"]
    assert events["operationId"] == "jobs_events_retrieve"
    assert events["parameters"] == paths["/api/tasks/{id}/"]["get"]["parameters"]


def test_the_hook_describes_the_stream_with_camelized_names(db):
    # Named as CAMELIZE_NAMES names the detail it mirrors (jobsRetrieve).
    paths = project_schema(CAMELIZE_NAMES=True)["paths"]
    assert paths["/api/jobs/{id}/events/"]["get"]["operationId"] == "jobsEventsRetrieve"
