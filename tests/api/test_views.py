"""List, create, detail and cancel, through the URLs a project mounts."""

import contextlib
import datetime
import io
import json
import threading
from urllib.parse import quote

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers

from task_ferry.api.serializers import RelatedKeyField
from task_ferry.handler import JobHandler
from task_ferry.models import CancelRequest, Job
from task_ferry.registry import JobType, job_type_registry
from task_ferry.snapshot import job_snapshot
from task_ferry.stores.base import get_store
from tests.api.helpers import LinkedByApiJobType, client_for, create, needs_redis, start
from tests.myapp.job_types import ExportJobType
from tests.myapp.models import ExportJob
from tests.testapp.models import LinkedJob, Marker, ScriptedJob

URL = "/api/jobs/"


def _parse(value):
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def ids(response):
    return [job["id"] for job in response.json()["results"]]


# List


def test_list_shows_only_the_callers_jobs_newest_first(api, user, other_user, hold):
    mine = [create(user, steps=1) for _ in range(3)]
    create(other_user, steps=1)
    create(None, steps=1)
    response = api.get(URL)
    assert response.status_code == 200
    assert ids(response) == [job.pk for job in reversed(mine)]
    assert response.json()["count"] == 3


def test_list_items_carry_type_and_own_fields(api, user):
    create(user, "export_table", table_id=1)
    create(user, steps=2)
    export, scripted = sorted(api.get(URL).json()["results"], key=lambda j: j["type"])
    assert export["type"] == "export_table"
    assert export["table_id"] == 1
    assert export["output_path"] == "/exports/result.csv"
    assert "steps" not in export
    assert scripted["type"] == "scripted"
    assert scripted["steps"] == 2
    assert scripted["result"] == "done"


def test_list_filters_by_several_states_and_by_type(api, user, hold):
    pending = create(user, steps=1)
    cancelled = create(user, steps=1)
    JobHandler.cancel(user, cancelled.pk)
    started = start(create(user, steps=1))
    export = create(user, "export_table", table_id=1)

    assert set(ids(api.get(URL, {"state": ["pending", "cancelled"]}))) == {
        pending.pk,
        cancelled.pk,
        export.pk,
    }
    assert set(ids(api.get(URL + "?state=started,cancelled"))) == {started.pk, cancelled.pk}
    assert set(ids(api.get(URL, {"state": "live"}))) == {pending.pk, started.pk, export.pk}
    assert ids(api.get(URL, {"state": "ended"})) == [cancelled.pk]
    assert ids(api.get(URL, {"type": "export_table"})) == [export.pk]
    assert set(ids(api.get(URL, {"type": "scripted", "state": "pending"}))) == {pending.pk}
    assert len(ids(api.get(URL, {"type": "export_table,scripted"}))) == 4


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ({"state": "running"}, "state"),
        ({"type": "nope"}, "type"),
        ({"limit": "0"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"offset": "-1"}, "offset"),
    ],
)
def test_list_rejects_bad_query_parameters_by_name(api, user, query, name):
    response = api.get(URL, query)
    assert response.status_code == 400
    assert list(response.json()) == [name]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"offset": "-1"}, "Must be a whole number, 0 or more, got '-1'."),
        ({"offset": "1.5"}, "Must be a whole number, 0 or more, got '1.5'."),
        (
            {"offset": str(2**62 + 1)},
            f"Too large: no list has that many jobs to skip, got '{2**62 + 1}'.",
        ),
        ({"offset": "9" * 5000}, None),
        ({"limit": "0"}, "Must be a whole number from 1 to 200, got '0'."),
        ({"limit": "abc"}, "Must be a whole number from 1 to 200, got 'abc'."),
        # int() reads these as numbers; a job id in another spelling is a 404 too.
        ({"limit": "\u0661\u0662"}, "Must be a whole number from 1 to 200, got '\u0661\u0662'."),
        ({"limit": "1_0"}, "Must be a whole number from 1 to 200, got '1_0'."),
        ({"limit": " 5"}, "Must be a whole number from 1 to 200, got ' 5'."),
        ({"offset": "+3"}, "Must be a whole number, 0 or more, got '+3'."),
        ({"offset": "\uff13"}, "Must be a whole number, 0 or more, got '\uff13'."),
    ],
)
def test_list_says_what_a_page_parameter_may_be(api, user, query, message):
    # Not "from 0 to 4611686018427387904": the bound beyond any list is no use to a client.
    [(name, [text])] = api.get(URL, query).json().items()
    assert name in query
    if message is None:
        assert text.startswith("Too large: no list has that many jobs to skip")
    else:
        assert text == message
    assert str(2**62) not in text


def test_list_takes_the_largest_offset(api, user, hold):
    create(user, steps=1)
    response = api.get(URL, {"offset": str(2**62)})
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_list_filters_by_a_removed_type_while_the_caller_has_jobs_of_it(api, user, hold):
    # A client that filtered by a type before it was removed from the code gets its jobs.
    kept = create(user, steps=1)
    removed = create(user, steps=1)
    JobHandler.cancel(user, removed.pk)
    Job.objects.filter(pk=removed.pk).update(type="removed_type")

    response = api.get(URL, {"type": "removed_type"})
    assert response.status_code == 200
    [item] = response.json()["results"]
    assert (item["id"], item["type"], item["state"]) == (removed.pk, "removed_type", "cancelled")
    assert "steps" not in item  # no type, no type's own fields
    assert set(ids(api.get(URL, {"type": "removed_type,scripted"}))) == {kept.pk, removed.pk}
    # Known whatever the states asked for: none of them live.
    assert ids(api.get(URL, {"type": "removed_type", "state": "live"})) == []


def test_list_type_filter_still_refuses_a_name_none_of_the_callers_jobs_has(
    api, user, other_user, hold
):
    create(user, steps=1)
    others = create(other_user, steps=1)
    Job.objects.filter(pk=others.pk).update(type="removed_type")
    # A typo, or a removed type only someone else has jobs of (which must not show), or text
    # no row can hold (PostgreSQL refuses a NUL in a query too).
    for name in ("scirpted", "removed_type", "a\x00b"):
        response = api.get(URL, {"type": f"scripted,{name}"})
        assert response.status_code == 400
        assert response.json() == {
            "type": [
                f"Unknown type {name!r}. Choose from: autocommit, export_table, limited, routed, "
                f"scripted, time_limited."
            ]
        }


def test_list_paginates_with_limit_and_offset(api, user, hold):
    jobs = [create(user, steps=1) for _ in range(5)]
    newest_first = [job.pk for job in reversed(jobs)]
    first = api.get(URL, {"limit": 2}).json()
    assert first["count"] == 5
    assert [j["id"] for j in first["results"]] == newest_first[:2]
    assert first["previous"] is None
    second = api.get(first["next"]).json()
    assert [j["id"] for j in second["results"]] == newest_first[2:4]
    assert [j["id"] for j in api.get(URL, {"limit": 2, "offset": 4}).json()["results"]] == [
        newest_first[4]
    ]


def test_a_page_of_fifty_jobs_of_several_types_costs_few_queries(
    session_api, user, django_assert_max_num_queries
):
    for i in range(50):
        if i % 3 == 0:
            create(user, "export_table", table_id=1)
        elif i % 3 == 1:
            create(user, "limited", label=f"job {i}")
        else:
            create(user, steps=1)
    with django_assert_max_num_queries(5):
        response = session_api.get(URL, {"limit": 50})
    results = response.json()["results"]
    assert len(results) == 50
    assert {job["type"] for job in results} == {"export_table", "limited", "scripted"}
    assert all("table_id" in j for j in results if j["type"] == "export_table")
    assert all(j["label"].startswith("job ") for j in results if j["type"] == "limited")
    assert all(j["result"] == "done" for j in results if j["type"] == "scripted")


def test_list_shows_live_progress_from_the_progress_store(api, user, hold):
    job = start(create(user, steps=10), percentage=40, label="step 4 of 10")
    (item,) = api.get(URL).json()["results"]
    assert item["id"] == job.pk
    assert (item["state"], item["progress_percentage"], item["progress_state"]) == (
        "started",
        40,
        "step 4 of 10",
    )
    assert Job.objects.get(pk=job.pk).progress_percentage == 0


def test_an_earlier_jobs_snapshot_under_the_same_id_is_not_shown(api, user, hold):
    # Ids come round again (a database restored from a backup, a test database created anew)
    # while the store keeps the earlier job's snapshot.
    job = create(user, steps=10)
    earlier = {
        **job_snapshot(job),
        "state": "finished",
        "progress_percentage": 100,
        "created_at": "2020-01-01T00:00:00Z",
    }
    get_store().write(job.pk, earlier)
    (item,) = api.get(URL).json()["results"]
    assert (item["state"], item["progress_percentage"]) == ("pending", 0)
    out = io.StringIO()
    call_command("task_ferry_jobs", stdout=out)
    assert out.getvalue().split() == [f"#{job.pk}", "scripted", user.username, "pending", "0%"]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="PostgreSQL converts time zones itself")
def test_live_progress_is_listed_where_the_database_keeps_local_times(
    api, user, hold, monkeypatch, request
):
    """DATABASES["default"]["TIME_ZONE"] (a legacy database in local time): rows load as
    aware datetimes in that zone, the job's snapshot was made in UTC."""
    default = connections["default"]
    monkeypatch.setitem(default.settings_dict, "TIME_ZONE", "America/Sao_Paulo")

    def forget_zone():
        for cached in ("timezone", "timezone_name"):
            default.__dict__.pop(cached, None)

    forget_zone()
    request.addfinalizer(forget_zone)
    job = start(create(user, steps=10), percentage=40, label="Step 4")
    (item,) = api.get(URL).json()["results"]
    assert (item["state"], item["progress_percentage"]) == ("started", 40)
    created_at = Job.objects.get(pk=job.pk).created_at
    assert created_at.utcoffset() == datetime.timedelta(hours=-3)
    assert item["created_at"] == created_at.astimezone(datetime.UTC).isoformat()[:-6] + "Z"


# Create


def test_create_validates_and_starts_a_job_of_the_type(api, user):
    response = api.post(URL, {"type": "scripted", "steps": 3}, format="json")
    assert response.status_code == 201
    body = response.json()
    job = ScriptedJob.objects.get(pk=body["id"])
    assert job.user == user and job.steps == 3
    assert body["type"] == "scripted"
    assert body["state"] == "finished"
    assert body["result"] == "done"
    assert body["steps"] == 3


@pytest.mark.django_db(transaction=True)
def test_a_job_created_in_an_atomic_request_is_polled_from_its_committed_row(
    api, user, store, monkeypatch
):
    from task_ferry.executors.immediate import ImmediateExecutor

    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    seen_in_request = []
    monkeypatch.setattr(
        ImmediateExecutor,
        "enqueue",
        lambda self, job_id: seen_in_request.append(store.read(job_id)),
    )
    response = api.post(URL, {"type": "scripted", "steps": 3}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert (body["state"], body["steps"]) == ("pending", 3)
    # The executor got the job with nothing in the store; the first poll after the request
    # committed reads the row, and stores its snapshot.
    assert seen_in_request == [None]
    assert api.get(f"{URL}{body['id']}/").json()["steps"] == 3
    assert store.read(body["id"])["state"] == "pending"


def test_create_reports_field_errors_in_drfs_shape(api, user):
    response = api.post(URL, {"type": "scripted", "steps": "many", "fail_at": "x"}, format="json")
    assert response.status_code == 400
    assert response.json() == {
        "steps": ["A valid integer is required."],
        "fail_at": ["A valid integer is required."],
    }
    response = api.post(URL, {"type": "export_table"}, format="json")
    assert response.json() == {"table_id": ["This field is required."]}
    assert not Job.objects.exists()


def test_create_rejects_fields_the_type_does_not_have(api, user):
    for body, field in [
        ({"type": "scripted", "bogus": 1}, "bogus"),
        ({"type": "scripted", "state": "finished"}, "state"),
        ({"type": "scripted", "user": 2}, "user"),
        ({"type": "scripted", "job_type_name": "x"}, "job_type_name"),
        ({"type": "scripted", "cls": 1}, "cls"),
    ]:
        response = api.post(URL, body, format="json")
        assert response.status_code == 400, body
        assert field in response.json()
    assert not Job.objects.exists()


def test_create_refuses_the_link_to_the_job_row(api, user, other_user, hold):
    # With it, a client picked the new job's id: another user's id answered the database's
    # "already exists", a free one was taken and later failed someone else's create.
    taken = create(other_user, "limited").pk
    for value in (taken, taken + 1000):
        for body in (
            {"type": "limited", "job_ptr_id": value},
            {"type": "export_table", "table_id": 1, "job_ptr_id": value},
        ):
            response = api.post(URL, body, format="json")
            assert (response.status_code, response.json()) == (
                400,
                {"job_ptr_id": ["Unknown field."]},
            ), body
    assert list(Job.objects.values_list("pk", flat=True)) == [taken]


def test_create_needs_a_json_object_with_a_type(api, user):
    response = api.post(URL, [1, 2], format="json")
    assert response.status_code == 400
    assert "JSON object" in response.json()["non_field_errors"][0]
    response = api.post(URL, {"steps": 1}, format="json")
    assert response.json() == {"type": ["This field is required."]}


def test_create_refuses_a_field_name_with_a_lone_surrogate_with_a_400(api, user):
    # JSON lets a key hold one ("\ud800"); naming it in an error as given made the response
    # impossible to encode, a 500.
    for body in ('{"type": "scripted", "\\ud800": 1}', '{"\\udfff x": 1, "type": "nope"}'):
        response = api.post(URL, body, content_type="application/json")
        assert response.status_code == 400, body
        message = response.json()["non_field_errors"][0]
        assert "lone surrogate" in message
        assert "valid Unicode" in message
    assert not Job.objects.exists()


# Past the json module's nesting limit on every supported Python (3.13 parses 5,000 levels).
@pytest.mark.parametrize("depth", [20_000, 100_000])
def test_create_refuses_json_nested_past_the_parsers_limit_with_a_400(api, user, depth):
    # Python's parser raised RecursionError, which DRF does not take for a parse error: a 500.
    for body in (
        "[" * depth + "]" * depth,
        '{"type": "scripted", "steps": ' + "[" * depth + "1" + "]" * depth + "}",
    ):
        response = api.post(URL, body, content_type="application/json")
        assert response.status_code == 400
        assert response.json() == {"detail": "JSON parse error - nested too deeply."}
    assert not Job.objects.exists()


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_create_refuses_a_body_over_data_upload_max_memory_size_with_a_json_400(
    api, user, settings, content_type
):
    # Django's own answer is its HTML "Bad Request (400)" page.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    if content_type == "application/json":
        body = json.dumps({"type": "scripted", "marker": "x" * 2000})
    else:
        body = "type=scripted&marker=" + "x" * 2000
    response = api.post(URL, body, content_type=content_type)
    assert response.status_code == 400
    assert response.json() == {
        "detail": "The request body is larger than this server takes (1000 bytes)."
    }
    assert not Job.objects.exists()


def test_create_refuses_a_form_over_data_upload_max_number_fields_with_a_json_400(
    api, user, settings
):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    body = "type=scripted&" + "&".join(f"x{i}=1" for i in range(20))
    response = api.post(URL, body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400
    assert response.json() == {"detail": "The form has more fields than this server takes (10)."}
    assert not Job.objects.exists()


def test_create_of_an_unknown_type_lists_the_known_types(api, user):
    response = api.post(URL, {"type": "exprot_table"}, format="json")
    assert response.status_code == 400
    message = response.json()["type"][0]
    assert "'exprot_table'" in message
    for name in job_type_registry.names():
        assert repr(name) in message


def test_create_uses_the_types_serializer_class_then_prepare_values(api, user, monkeypatch):
    class LooseExportSerializer(serializers.Serializer):
        table_id = serializers.IntegerField(required=False, min_value=1)

    monkeypatch.setattr(ExportJobType, "serializer_class", LooseExportSerializer)
    response = api.post(URL, {"type": "export_table", "table_id": 0}, format="json")
    assert response.json() == {"table_id": ["Ensure this value is greater than or equal to 1."]}
    # Passes the serializer; the README's prepare_values rejects it.
    response = api.post(URL, {"type": "export_table"}, format="json")
    assert response.status_code == 400
    assert response.json() == {"non_field_errors": ["table_id is required"]}
    response = api.post(URL, {"type": "export_table", "table_id": 2}, format="json")
    assert response.status_code == 201
    # The serializer chooses the type's fields in responses too.
    assert response.json()["table_id"] == 2
    assert "output_path" not in response.json()


def test_create_without_a_value_the_model_requires_says_it_is_required(
    api, user, hold, monkeypatch
):
    # A serializer that leaves table_id optional, and JobType's own prepare_values: the
    # model's validation refused the missing value as "This field cannot be null."
    class Loose(serializers.Serializer):
        table_id = serializers.IntegerField(required=False, allow_null=True)

    monkeypatch.setattr(ExportJobType, "serializer_class", Loose)
    monkeypatch.setattr(ExportJobType, "prepare_values", JobType.prepare_values)
    response = api.post(URL, {"type": "export_table"}, format="json")
    assert (response.status_code, response.json()) == (
        400,
        {"table_id": ["This field is required."]},
    )
    response = api.post(URL, {"type": "export_table", "table_id": None}, format="json")
    assert (response.status_code, response.json()) == (
        400,
        {"table_id": ["This field cannot be null."]},
    )
    assert not Job.objects.exists()


class TablesExportSerializer(serializers.Serializer):
    table_id = serializers.IntegerField()
    also = serializers.ListField(child=serializers.IntegerField(), write_only=True)
    formats = serializers.MultipleChoiceField(choices=["csv", "xlsx"], write_only=True)


@pytest.mark.parametrize("form", ["multipart", "urlencoded", "json"])
def test_create_reads_every_value_of_a_list_field_in_a_form(api, user, hold, monkeypatch, form):
    # The schema offers form and multipart bodies; a repeated key was read as its last value,
    # a string, and refused: "Expected a list of items but got type "str"."
    monkeypatch.setattr(ExportJobType, "serializer_class", TablesExportSerializer)
    received = []

    def prepare_values(self, values, user):
        received.append({"also": values.pop("also"), "formats": sorted(values.pop("formats"))})
        return values

    monkeypatch.setattr(ExportJobType, "prepare_values", prepare_values)
    body = {"type": "export_table", "table_id": 4, "also": [5, 6], "formats": ["csv", "xlsx"]}
    if form == "urlencoded":
        response = api.post(
            URL,
            "type=export_table&table_id=4&also=5&also=6&formats=csv&formats=xlsx",
            content_type="application/x-www-form-urlencoded",
        )
    else:
        response = api.post(URL, body, format=form)
    assert response.status_code == 201, response.json()
    assert received == [{"also": [5, 6], "formats": ["csv", "xlsx"]}]
    assert ExportJob.objects.get().table_id == 4


def test_create_refuses_a_column_the_types_serializer_leaves_out(api, user, hold, monkeypatch):
    class TableOnly(serializers.ModelSerializer):
        class Meta:
            model = ExportJob
            fields = ["table_id"]

    monkeypatch.setattr(ExportJobType, "serializer_class", TableOnly)
    body = {"type": "export_table", "table_id": 1, "output_path": "/etc/passwd"}
    response = api.post(URL, body, format="json")
    assert (response.status_code, response.json()) == (400, {"output_path": ["Unknown field."]})
    assert not Job.objects.exists()


def test_create_refuses_a_value_for_a_read_only_field(api, user, hold, monkeypatch):
    # DRF would drop it, and the client would believe the job had it.
    class PathShown(serializers.ModelSerializer):
        class Meta:
            model = ExportJob
            fields = ["table_id", "output_path"]
            read_only_fields = ["output_path"]

    monkeypatch.setattr(ExportJobType, "serializer_class", PathShown)
    body = {"type": "export_table", "table_id": 1, "output_path": "/tmp/mine.csv"}
    response = api.post(URL, body, format="json")
    assert (response.status_code, response.json()) == (
        400,
        {"output_path": ["This field is read-only."]},
    )
    assert not Job.objects.exists()
    response = api.post(URL, {"type": "export_table", "table_id": 1}, format="json")
    assert (response.status_code, response.json()["output_path"]) == (201, "")


def test_a_type_that_does_not_opt_in_cannot_be_started_through_the_api(
    api, user, hold, monkeypatch, tmp_path, caplog
):
    # The README's type, as the README writes it: a client must not pick the file its
    # on_cancelled deletes.
    monkeypatch.setattr(ExportJobType, "api_create", False)
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    body = {"type": "export_table", "table_id": 1, "output_path": str(precious)}
    with caplog.at_level("INFO", logger="task_ferry"):
        response = api.post(URL, body, format="json")
    assert response.status_code == 400
    message = response.json()["type"][0]
    assert message.startswith("No job type named 'export_table'.")
    assert "'export_table'" not in message.split("Known job types:")[1]
    assert message.endswith(" Job types opt in to this API with api_create = True.")
    assert not Job.objects.exists()
    # The developer learns from the log why; the client no more than for a name no type has.
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "task_ferry"] == [
        (
            "WARNING",
            f"POST {URL}: job type 'export_table' exists but does not set api_create = True, "
            "so API clients cannot start it (they are told no such type can be started). Set "
            "api_create = True on tests.myapp.job_types.ExportJobType to open it to them.",
        )
    ]
    caplog.clear()
    with caplog.at_level("INFO", logger="task_ferry"):
        unknown = api.post(URL, {**body, "type": "export_tables"}, format="json")
    assert unknown.json()["type"][0] == message.replace("'export_table'", "'export_tables'", 1)
    assert [r for r in caplog.records if r.name == "task_ferry"] == []
    # The Python API is unchanged: the project's own code starts any type.
    assert JobHandler.create_and_start(user, "export_table", table_id=1).pk
    assert precious.exists()


def test_with_no_type_open_to_the_api_create_says_so(api, hold, monkeypatch, caplog):
    for job_type in job_type_registry:
        monkeypatch.setattr(type(job_type), "api_create", False)
    message = (
        "No job type named {} can be started through this API: job types opt in with "
        "api_create = True."
    )
    with caplog.at_level("INFO", logger="task_ferry"):
        response = api.post(URL, {"type": "scripted"}, format="json")
    assert (response.status_code, response.json()) == (
        400,
        {"type": [message.format("'scripted'")]},
    )
    assert [r.levelname for r in caplog.records if r.name == "task_ferry"] == ["WARNING"]
    assert "job type 'scripted' exists but does not set api_create = True" in caplog.text
    # A name no type has, or that is no name, is answered alike, and logged by none.
    caplog.clear()
    with caplog.at_level("INFO", logger="task_ferry"):
        for name in ["nope", 7, ["scripted"]]:
            response = api.post(URL, {"type": name}, format="json")
            assert response.json() == {"type": [message.format(repr(name))]}
    assert [r for r in caplog.records if r.name == "task_ferry"] == []


def test_create_beyond_max_count_is_429_with_the_limit(api, user, hold):
    for _ in range(2):
        assert api.post(URL, {"type": "limited"}, format="json").status_code == 201
    response = api.post(URL, {"type": "limited"}, format="json")
    assert response.status_code == 429
    body = response.json()
    assert body["code"] == "max_job_count_exceeded"
    assert body["max_count"] == 2 and body["type"] == "limited"
    assert "2 unfinished 'limited'" in body["detail"]
    assert Job.objects.count() == 2


def test_create_answers_a_job_that_failed_inline_as_failed(api, user):
    response = api.post(URL, {"type": "scripted", "fail_at": 1}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["state"] == "failed"
    assert body["human_readable_error"] == "Something went wrong while running this job."


# Many-to-many fields, and JSON in a form


def marker_pks(*names):
    return [Marker.objects.create(name=name).pk for name in names]


def post_form(api, body, form):
    """``body`` as JSON, multipart, or urlencoded with a list's values as a repeated key."""
    if form != "urlencoded":
        return api.post(URL, body, format=form)
    pairs = [
        (key, item)
        for key, value in body.items()
        for item in (value if isinstance(value, list) else [value])
    ]
    return api.post(
        URL,
        "&".join(f"{key}={quote(str(item))}" for key, item in pairs),
        content_type="application/x-www-form-urlencoded",
    )


def linked_pks(job_id, field):
    return sorted(getattr(LinkedJob.objects.get(pk=job_id), field).values_list("pk", flat=True))


@pytest.mark.parametrize("form", ["json", "multipart", "urlencoded"])
def test_create_takes_a_many_to_many_field_as_a_list_of_keys_shown_as_such(
    api, user, linked_by_api, form
):
    first, second = marker_pks("first", "second")
    # JSON's list reached the job past the type's serializer, and no response showed it; a
    # form's repeated key was read as its last value, a string, and refused.
    response = post_form(api, {"type": "linked", "markers": [first, second]}, form)
    assert response.status_code == 201, response.json()
    job_id = response.json()["id"]
    assert linked_pks(job_id, "markers") == [first, second]
    assert sorted(response.json()["markers"]) == [first, second]
    # Answered from the final snapshot the run stored.
    assert sorted(api.get(f"{URL}{job_id}/").json()["markers"]) == [first, second]
    (listed,) = api.get(URL).json()["results"]
    assert sorted(listed["markers"]) == [first, second]
    response = post_form(api, {"type": "linked"}, form)
    assert (response.status_code, response.json()["markers"]) == (201, [])


def test_create_refuses_many_to_many_keys_of_no_row_naming_the_field(
    api, user, hold, linked_by_api
):
    (first,) = marker_pks("first")
    for markers, message in [
        ([first, first + 1000], f'Invalid pk "{first + 1000}" - object does not exist.'),
        ([2**70], f'Invalid pk "{2**70}" - object does not exist.'),
        (["9" * 50], f'Invalid pk "{"9" * 50}" - object does not exist.'),
        (first, 'Expected a list of items but got type "int".'),
        (str(first), 'Expected a list of items but got type "str".'),
    ]:
        response = api.post(URL, {"type": "linked", "markers": markers}, format="json")
        assert (response.status_code, response.json()) == (400, {"markers": [message]})
    response = post_form(api, {"type": "linked", "markers": [first, first + 1000]}, "urlencoded")
    assert response.json() == {"markers": [f'Invalid pk "{first + 1000}" - object does not exist.']}
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    "markers, message",
    [
        # Django's int() made each of these a key: 1.0 and 1.5 linked row 1.
        ([1.0], "Incorrect type. Expected an integer key, received float 1.0."),
        ([1.5], "Incorrect type. Expected an integer key, received float 1.5."),
        ([True], "Incorrect type. Expected an integer key, received bool true."),
        (["1_0"], 'Incorrect type. Expected an integer key, received str "1_0".'),
        (["1.0"], 'Incorrect type. Expected an integer key, received str "1.0".'),
        (["x"], 'Incorrect type. Expected an integer key, received str "x".'),
        ([[1]], "Incorrect type. Expected an integer key, received list."),
        # It was 'Invalid pk "None" - object does not exist.'
        ([None], "The list may not contain null: send only keys of rows."),
    ],
)
def test_create_refuses_many_to_many_items_that_are_no_integer_key_saying_why(
    api, user, hold, linked_by_api, markers, message
):
    # A row of each key Django would have made of them, the first one before them.
    first, *_ = marker_pks(*"abcdefghij")
    response = api.post(URL, {"type": "linked", "markers": [first, *markers]}, format="json")
    assert (response.status_code, response.json()) == (400, {"markers": [message]})
    assert not Job.objects.exists()


def test_create_refuses_a_foreign_key_that_is_no_integer_key(api, user, hold, linked_by_api):
    (first,) = marker_pks("first")
    response = api.post(URL, {"type": "linked", "marker": float(first)}, format="json")
    assert (response.status_code, response.json()) == (
        400,
        {"marker": [f"Incorrect type. Expected an integer key, received float {first}.0."]},
    )
    response = api.post(URL, {"type": "linked", "marker": str(first)}, format="json")
    assert (response.status_code, response.json()["marker"]) == (201, first)


@pytest.mark.parametrize("form", ["json", "multipart", "urlencoded"])
def test_create_takes_many_to_many_keys_as_strings_of_digits(api, user, hold, linked_by_api, form):
    first, second = marker_pks("first", "second")
    body = {"type": "linked", "markers": [str(first), f" {second} "]}
    response = post_form(api, body, form)
    assert response.status_code == 201, response.json()
    assert linked_pks(response.json()["id"], "markers") == [first, second]


def marker_reads(queries):
    """The queries that read markers by their keys."""
    table = Marker._meta.db_table
    plain = [q["sql"].replace('"', "").replace("`", "") for q in queries]
    return [sql for sql in plain if f"FROM {table} WHERE {table}.id" in sql]


def test_create_reads_a_many_to_many_list_in_one_query(api, user, hold, linked_by_api):
    keys = marker_pks(*"abcdefgh")

    def post(markers):
        with CaptureQueriesContext(connection) as queries:
            response = api.post(URL, {"type": "linked", "markers": markers}, format="json")
        return response, marker_reads(queries)

    # The serializer's read of the rows, and the handler's check that they exist before it
    # links them (on MySQL a link to no row is dropped without a word). The serializer read
    # each key on its own: nine queries here.
    response, reads = post(keys)
    assert response.status_code == 201, response.json()
    assert linked_pks(response.json()["id"], "markers") == keys
    assert len(reads) == 2, reads
    response, reads = post([*keys, keys[0]])
    assert response.status_code == 201, response.json()
    assert len(reads) == 2, reads
    # The first missing key in the list's order, as when each was read on its own.
    response, reads = post([*keys, keys[-1] + 7, keys[-1] + 5])
    assert response.json() == {"markers": [f'Invalid pk "{keys[-1] + 7}" - object does not exist.']}
    assert len(reads) == 1
    response, reads = post([keys[-1] + 5, 1.5])
    assert response.json() == {"markers": [f'Invalid pk "{keys[-1] + 5}" - object does not exist.']}
    response, reads = post([keys[0], 1.5, keys[-1] + 5])
    assert response.json() == {
        "markers": ["Incorrect type. Expected an integer key, received float 1.5."]
    }
    response, reads = post([2**70, -(2**70)])
    assert response.json() == {"markers": [f'Invalid pk "{2**70}" - object does not exist.']}
    assert reads == []


def test_a_many_to_many_field_through_a_model_of_the_projects_is_shown_read_only(
    api, user, hold, linked_by_api, monkeypatch
):
    (tag,) = marker_pks("tag")
    # As DRF's ModelSerializer does: the link may need values of its own. It was linked, and
    # shown nowhere.
    response = api.post(URL, {"type": "linked", "tags": [tag]}, format="json")
    assert (response.status_code, response.json()) == (400, {"tags": ["This field is read-only."]})
    job = create(user, "linked", tags=[tag])
    assert api.get(f"{URL}{job.pk}/").json()["tags"] == [tag]

    class TagsWritable(serializers.ModelSerializer):
        tags = serializers.PrimaryKeyRelatedField(many=True, queryset=Marker.objects.all())

        class Meta:
            model = LinkedJob
            fields = ["markers", "tags"]

    monkeypatch.setattr(LinkedByApiJobType, "serializer_class", TagsWritable)
    response = api.post(URL, {"type": "linked", "tags": [tag]}, format="json")
    assert (response.status_code, response.json()["tags"]) == (201, [tag])
    assert linked_pks(response.json()["id"], "tags") == [tag]


class OwnMarkersField(RelatedKeyField):
    """docs/api.md's field that offers the caller's rows only (here: markers named after them)."""

    def get_queryset(self):
        return Marker.objects.filter(name=self.context["request"].user.username)


def test_a_types_serializer_may_offer_only_the_callers_rows(
    api, user, other_user, hold, linked_by_api, monkeypatch
):
    class OwnMarkersSerializer(serializers.ModelSerializer):
        markers = OwnMarkersField(many=True)

        class Meta:
            model = LinkedJob
            fields = ["markers"]

    mine, theirs = marker_pks(user.username, other_user.username)
    # The default field takes anyone's rows.
    response = api.post(URL, {"type": "linked", "markers": [theirs]}, format="json")
    assert (response.status_code, response.json()["markers"]) == (201, [theirs])
    monkeypatch.setattr(LinkedByApiJobType, "serializer_class", OwnMarkersSerializer)
    response = api.post(URL, {"type": "linked", "markers": [mine, theirs]}, format="json")
    assert response.json() == {"markers": [f'Invalid pk "{theirs}" - object does not exist.']}
    response = api.post(URL, {"type": "linked", "markers": [mine, 1.0]}, format="json")
    assert response.json() == {
        "markers": ["Incorrect type. Expected an integer key, received float 1.0."]
    }
    response = api.post(URL, {"type": "linked", "markers": [mine]}, format="json")
    assert (response.status_code, response.json()["markers"]) == (201, [mine])
    assert api.get(URL).json()["results"][0]["markers"] == [mine]


def test_create_refuses_a_many_to_many_field_the_types_serializer_leaves_out(
    api, user, hold, linked_by_api, monkeypatch
):
    class DetailsOnly(serializers.ModelSerializer):
        class Meta:
            model = LinkedJob
            fields = ["details"]

    monkeypatch.setattr(LinkedByApiJobType, "serializer_class", DetailsOnly)
    (marker,) = marker_pks("marker")
    # It went past the serializer to the job, which linked it.
    response = api.post(URL, {"type": "linked", "markers": [marker]}, format="json")
    assert (response.status_code, response.json()) == (400, {"markers": ["Unknown field."]})
    assert not Job.objects.exists()


def test_a_page_of_jobs_with_many_to_many_fields_costs_no_query_per_job(
    api, user, hold, linked_by_api, django_assert_num_queries
):
    markers = marker_pks("a", "b", "c")
    for i in range(20):
        create(user, "linked", markers=markers[: i % 4], tags=markers[i % 3 : i % 3 + 1])
    create(user, "export_table", table_id=1)
    create(user, steps=1)
    # The count, the page, and each many-to-many field's links for the whole page.
    for limit in (50, 3):
        with django_assert_num_queries(4):
            response = api.get(URL, {"limit": limit, "offset": 1})
    with django_assert_num_queries(4):
        results = api.get(URL, {"limit": 50}).json()["results"]
    linked = [job for job in results if job["type"] == "linked"]
    assert len(linked) == 20
    assert [sorted(job["markers"]) for job in linked] == [
        linked_pks(job["id"], "markers") for job in linked
    ]
    assert [job["tags"] for job in linked] == [linked_pks(job["id"], "tags") for job in linked]
    assert response.status_code == 200


@pytest.mark.parametrize("form", ["multipart", "urlencoded", "json"])
def test_a_json_field_takes_json_text_from_a_form(api, user, hold, linked_by_api, form):
    # A form has no JSON values: its text for a JSONField was stored as a JSON string, as if
    # a JSON body had sent that string.
    response = post_form(api, {"type": "linked", "details": '{"rows": [1, 2]}'}, form)
    assert response.status_code == 201, response.json()
    expected = '{"rows": [1, 2]}' if form == "json" else {"rows": [1, 2]}
    assert response.json()["details"] == expected
    assert LinkedJob.objects.get(pk=response.json()["id"]).details == expected
    if form != "json":
        response = post_form(api, {"type": "linked", "details": "{rows"}, form)
        assert (response.status_code, response.json()) == (
            400,
            {"details": ["Value must be valid JSON."]},
        )


# Detail


def test_detail_has_the_spec_keys_type_fields_and_times(api, user):
    job = create(user, "export_table", table_id=3)
    body = api.get(f"{URL}{job.pk}/").json()
    assert set(body) == {
        "id",
        "type",
        "state",
        "progress_percentage",
        "progress_state",
        "error",
        "human_readable_error",
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
        "eta",
        "table_id",
        "output_path",
    }
    assert body["type"] == "export_table" and body["table_id"] == 3
    assert body["output_path"] == "/exports/result.csv"
    assert _parse(body["created_at"]) <= _parse(body["started_at"]) <= _parse(body["finished_at"])
    assert body["eta"] is None


def test_detail_estimates_the_finish_from_progress(api, user, hold):
    job = start(create(user, steps=4), percentage=25, started_ago=30)
    body = api.get(f"{URL}{job.pk}/").json()
    eta = _parse(body["eta"])
    expected = _parse(body["started_at"]) + datetime.timedelta(seconds=120)
    assert abs((eta - expected).total_seconds()) < 5
    job = create(user, steps=4)
    assert api.get(f"{URL}{job.pk}/").json()["eta"] is None


def test_detail_estimates_the_finish_with_use_tz_off(api, user, hold, settings):
    # Projects started before Django 5.0 may still run with naive local times.
    settings.USE_TZ = False
    job = start(create(user, steps=4), percentage=25, started_ago=30)
    response = api.get(f"{URL}{job.pk}/")
    assert response.status_code == 200
    body = response.json()
    eta = datetime.datetime.fromisoformat(body["eta"])
    expected = datetime.datetime.fromisoformat(body["started_at"]) + datetime.timedelta(seconds=120)
    assert eta.tzinfo is None
    assert abs((eta - expected).total_seconds()) < 5
    listed = datetime.datetime.fromisoformat(api.get(URL).json()["results"][0]["eta"])
    assert abs((listed - expected).total_seconds()) < 5


def test_detail_of_a_live_job_makes_no_query(api, user, hold):
    job = start(create(user, steps=10), percentage=30, label="step 3 of 10")
    with CaptureQueriesContext(connection) as queries:
        response = api.get(f"{URL}{job.pk}/")
    assert len(queries) == 0, [q["sql"] for q in queries]
    body = response.json()
    assert (body["state"], body["progress_percentage"], body["progress_state"]) == (
        "started",
        30,
        "step 3 of 10",
    )
    assert body["steps"] == 10 and body["tick_delay"] == 0


def test_detail_with_session_auth_queries_only_session_and_user(session_api, user, hold):
    job = start(create(user, steps=10), percentage=30)
    with CaptureQueriesContext(connection) as queries:
        assert session_api.get(f"{URL}{job.pk}/").status_code == 200
    tables = " ".join(q["sql"] for q in queries)
    assert "task_ferry_job" not in tables and "testapp_" not in tables
    assert len(queries) <= 2


def test_the_snapshot_carries_the_types_fields(api, user, store, hold):
    job = create(user, "export_table", table_id=7)
    api.get(f"{URL}{job.pk}/")
    assert store.read(job.pk)["fields"] == {"table_id": 7, "output_path": ""}


def test_a_pending_jobs_first_poll_stores_its_snapshot_so_later_polls_skip_the_database(
    api, user, store, hold
):
    job = create(user, steps=5)
    # Creating a job writes nothing to the store: most jobs are never polled while pending.
    assert store.read(job.pk) is None
    assert api.get(f"{URL}{job.pk}/").json()["state"] == "pending"
    assert store.read(job.pk)["state"] == "pending"
    with CaptureQueriesContext(connection) as queries:
        body = api.get(f"{URL}{job.pk}/").json()
    assert (body["state"], body["steps"]) == ("pending", 5)
    assert not [q for q in queries if "task_ferry_job" in q["sql"]]


def test_a_poll_never_replaces_the_snapshot_a_run_wrote_meanwhile(user, store, hold):
    job = create(user, steps=5)
    # A poll reads the pending row; before it stores what it read, a worker starts the job.
    read_by_the_poll = job_snapshot(job)
    start(job, percentage=40, label="step 2 of 5")
    store.write_if_absent(job.pk, read_by_the_poll)
    assert (store.read(job.pk)["state"], store.read(job.pk)["progress_percentage"]) == (
        "started",
        40,
    )


def test_a_first_poll_that_finds_a_snapshot_stored_meanwhile_reads_the_row_once(
    api, user, store, hold, monkeypatch
):
    """Another poll stored the job's snapshot between this poll's read of the store and its
    own write, which stored nothing: it read the job's row a second time all the same, to
    check a delete that only the poll that wrote the snapshot has to check."""
    from task_ferry.api import views

    job = create(user, steps=2)
    read_row = views.visible_job

    def row_read_then_stored_by_another_poll(*args):
        found = read_row(*args)
        store.write_if_absent(job.pk, job_snapshot(found))
        return found

    monkeypatch.setattr(views, "visible_job", row_read_then_stored_by_another_poll)
    with CaptureQueriesContext(connection) as queries:
        assert api.get(f"{URL}{job.pk}/").json()["state"] == "pending"
    assert len([q for q in queries if "task_ferry_job" in q["sql"]]) == 1


def test_write_if_absent_says_whether_it_stored_the_snapshot(user, store, hold):
    job = create(user, steps=5)
    assert store.write_if_absent(job.pk, job_snapshot(job)) is True
    start(job, percentage=40)
    assert store.write_if_absent(job.pk, job_snapshot(job)) is False
    assert store.read(job.pk)["progress_percentage"] == 40


def test_a_running_jobs_progress_shows_when_its_types_serializer_fails(
    api, user, store, hold, monkeypatch
):
    class NeedsRequest(serializers.ModelSerializer):
        class Meta:
            model = ScriptedJob
            fields = ["steps"]

        def to_representation(self, instance):
            return {"steps": instance.steps, "by": self.context["request"].user.pk}

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "serializer_class", NeedsRequest)
    # Without the request, the snapshots have no fields: the monitor's, and the row's.
    job = start(create(user, steps=5), percentage=40, label="step 2 of 5")
    assert "fields" not in store.read(job.pk)
    body = api.get(f"{URL}{job.pk}/").json()
    assert (body["state"], body["progress_percentage"]) == ("started", 40)


def test_create_refuses_a_value_named_like_the_source_of_another_field(
    api, user, hold, monkeypatch
):
    class Renamed(serializers.ModelSerializer):
        stepCount = serializers.IntegerField(source="steps")

        class Meta:
            model = ScriptedJob
            fields = ["stepCount"]

    monkeypatch.setattr(type(job_type_registry.get("scripted")), "serializer_class", Renamed)
    response = api.post(URL, {"type": "scripted", "stepCount": 2, "steps": 3}, format="json")
    assert (response.status_code, response.json()) == (400, {"steps": ["Unknown field."]})
    assert not Job.objects.exists()
    response = api.post(URL, {"type": "scripted", "stepCount": 2}, format="json")
    assert response.status_code == 201
    assert ScriptedJob.objects.get().steps == 2


def test_an_ended_jobs_poll_stores_no_snapshot(api, user, store, hold):
    job = create(user, steps=5)
    JobHandler.cancel(user, job.pk)
    store.delete([job.pk])
    assert api.get(f"{URL}{job.pk}/").json()["state"] == "cancelled"
    assert store.read(job.pk) is None


def test_detail_falls_back_to_the_database_when_the_store_has_no_snapshot(api, user, store, hold):
    job = create(user, steps=5)
    store.delete([job.pk])
    body = api.get(f"{URL}{job.pk}/").json()
    assert body["id"] == job.pk and body["state"] == "pending" and body["steps"] == 5
    # A snapshot written before snapshots carried fields is not trusted.
    stale = job_snapshot(job)
    del stale["fields"]
    store.write(job.pk, stale)
    assert api.get(f"{URL}{job.pk}/").json()["steps"] == 5


# Cancel


def test_cancel_a_pending_job(api, user, hold):
    job = create(user, steps=5)
    response = api.post(f"{URL}{job.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert Job.objects.get(pk=job.pk).state == "cancelled"


def test_cancel_a_running_job_asks_it_to_stop(api, user, store, hold):
    job = start(create(user, steps=5))
    response = api.post(f"{URL}{job.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["state"] == "started"
    assert store.is_cancel_requested(job.pk)


def test_cancel_of_a_running_job_answers_with_its_live_progress(api, user, store, hold):
    job = start(create(user, steps=5))
    live = job_snapshot(job)
    live.update(progress_percentage=61, progress_state="step 3 of 5")
    store.write(job.pk, live)
    body = api.post(f"{URL}{job.pk}/cancel/").json()
    assert (body["state"], body["progress_percentage"]) == ("started", 61)
    assert body["progress_state"] == "step 3 of 5"


def test_cancel_an_ended_job_changes_nothing(api, user):
    job = create(user, steps=1)
    response = api.post(f"{URL}{job.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["state"] == "finished"
    assert Job.objects.get(pk=job.pk).state == "finished"


@needs_redis
def test_cancel_while_the_store_is_unreachable_is_recorded_in_the_database(
    api, user, hold, settings
):
    job = start(create(user, steps=5))
    settings.TASK_FERRY = {**settings.TASK_FERRY, "REDIS_URL": "redis://127.0.0.1:1/0"}
    response = api.post(f"{URL}{job.pk}/cancel/")
    assert response.status_code == 200
    assert response.json()["state"] == "started"
    assert CancelRequest.objects.filter(job_id=job.pk).exists()
    # A second request is harmless.
    assert api.post(f"{URL}{job.pk}/cancel/").status_code == 200
    # The detail still answers, from the database.
    assert api.get(f"{URL}{job.pk}/").json()["state"] == "started"


def test_create_with_session_auth_respects_max_count(session_api, user, hold):
    # request.user is then a lazy proxy, not a User instance.
    for _ in range(2):
        response = session_api.post(URL, {"type": "limited"}, format="json")
        assert response.status_code == 201
    assert session_api.post(URL, {"type": "limited"}, format="json").status_code == 429


def test_a_broken_type_serializer_does_not_stop_progress_or_polls(api, user, store, monkeypatch):
    class Broken(serializers.Serializer):
        def to_representation(self, instance):
            raise RuntimeError("bug in the type's serializer")

    monkeypatch.setattr(ExportJobType, "serializer_class", Broken)
    job = create(user, "export_table", table_id=2)
    assert job.state == "finished"
    assert "fields" not in store.read(job.pk)
    body = api.get(f"{URL}{job.pk}/").json()
    assert (body["state"], body["progress_percentage"]) == ("finished", 100)
    assert "table_id" not in body


def test_a_poll_while_the_store_is_down_answers_from_the_row_and_asks_the_store_once(
    api, user, hold, redis_server, monkeypatch
):
    from task_ferry.stores.redis import RedisProgressStore

    job = create(user, steps=5)
    redis_server.stop()
    calls = []
    for name in ("read", "write_if_absent"):
        method = getattr(RedisProgressStore, name)
        monkeypatch.setattr(
            RedisProgressStore,
            name,
            lambda self, *args, _method=method, _name=name: (
                calls.append(_name) or _method(self, *args)
            ),
        )
    body = api.get(f"{URL}{job.pk}/").json()
    assert (body["state"], body["steps"]) == ("pending", 5)
    # A store that failed the read is not asked again: a frozen one would cost the poll twice.
    assert calls == ["read"]
    redis_server.start()
    api.get(f"{URL}{job.pk}/")
    assert calls[1:] == ["read", "write_if_absent"]


def test_a_type_serializer_giving_decimals_and_datetimes_publishes_and_streams(
    api, user, store, monkeypatch
):
    """A serializer's field may hand back what DRF's renderer encodes but ``json`` does not: a
    ``DecimalField(coerce_to_string=False)``, a method field returning a ``datetime``. Every
    write to the store raised ``TypeError``: the run's final publish raised into the caller,
    and the monitor stopped publishing and beating for every job of its process."""
    import decimal

    class PricedExportSerializer(serializers.ModelSerializer):
        price = serializers.SerializerMethodField()
        priced_at = serializers.SerializerMethodField()

        class Meta:
            model = ExportJob
            fields = ["table_id", "price", "priced_at"]

        def get_price(self, job):
            return decimal.Decimal("1.50")

        def get_priced_at(self, job):
            return datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

    monkeypatch.setattr(ExportJobType, "serializer_class", PricedExportSerializer)
    job = create(user, "export_table", table_id=3)
    assert ExportJob.objects.get(pk=job.pk).state == "finished"
    expected = {"table_id": 3, "price": 1.5, "priced_at": "2026-01-02T03:04:05Z"}
    assert store.read(job.pk)["fields"] == expected
    body = api.get(f"{URL}{job.pk}/").json()
    assert {key: body[key] for key in expected} == expected
    events = api.get(f"{URL}{job.pk}/events/").content.decode()
    assert '"price":1.5' in events and "event: end" in events


@pytest.mark.django_db(transaction=True)
def test_a_deleted_job_is_gone_from_detail_and_events_once_the_delete_commits(
    api, user, other_user, store, hold
):
    """Polls and streams are answered from the progress store, which kept a deleted job's
    snapshot for ``PROGRESS_CACHE_TIMEOUT``: a pending job deleted by the project's own code
    still showed as pending to the page following it, an ended one was still there."""
    from django.db import transaction

    pending, ended = create(user, steps=2), create(user, steps=2)
    JobHandler.run_job(ended.pk)
    assert api.get(f"{URL}{pending.pk}/").json()["state"] == "pending"
    assert store.read(ended.pk)["state"] == "finished"
    with transaction.atomic():
        Job.objects.filter(pk=pending.pk).delete()
        ScriptedJob.objects.get(pk=ended.pk).delete()
        # Not before the delete commits: rolled back, the job would be there still.
        assert store.read(pending.pk) is not None
    for job in (pending, ended):
        assert store.read(job.pk) is None
        assert api.get(f"{URL}{job.pk}/").status_code == 404
        assert api.get(f"{URL}{job.pk}/events/").status_code == 404
    # A rolled-back delete forgets nothing.
    kept = create(user, steps=2)
    api.get(f"{URL}{kept.pk}/")
    with contextlib.suppress(RuntimeError), transaction.atomic():
        Job.objects.filter(pk=kept.pk).delete()
        raise RuntimeError("rolled back")
    assert store.read(kept.pk)["state"] == "pending"
    # Deleting a user deletes their jobs (``Job.user`` cascades).
    others = create(other_user, steps=2)
    client_for(other_user).get(f"{URL}{others.pk}/")
    other_user.delete()
    assert store.read(others.pk) is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("endpoint", ["", "events/"])
def test_a_job_deleted_while_its_first_poll_reads_it_is_not_stored_again(
    api, user, store, hold, monkeypatch, endpoint
):
    """A pending job's first poll (or stream) reads its row, then stores the snapshot it built:
    a delete committed in between had the store forget the job first, so the poll stored it
    again, and polls and streams showed the deleted job as pending for
    ``PROGRESS_CACHE_TIMEOUT`` (a stream opening then waited five minutes for its end)."""
    from task_ferry.api import views

    job = create(user, steps=2)
    read_row = views.visible_job

    def row_read_then_job_deleted(*args):
        found = read_row(*args)
        Job.objects.filter(pk=job.pk).delete()
        return found

    monkeypatch.setattr(views, "visible_job", row_read_then_job_deleted)
    assert api.get(f"{URL}{job.pk}/{endpoint}").status_code == 404
    assert store.read(job.pk) is None
    monkeypatch.setattr(views, "visible_job", read_row)
    assert api.get(f"{URL}{job.pk}/").status_code == 404


@pytest.fixture
def requests_read_one_snapshot(transactional_db):
    """Each request runs in a transaction (``ATOMIC_REQUESTS``) whose reads all see the
    database as it was at the first one: REPEATABLE READ on PostgreSQL, MySQL and MariaDB, WAL
    mode on SQLite (a database file: set TASK_FERRY_TEST_SQLITE)."""
    from django.db import connection

    settings_dict = connection.settings_dict
    saved = {key: settings_dict.get(key) for key in ("OPTIONS", "ATOMIC_REQUESTS")}
    if connection.vendor == "sqlite":
        if connection.is_in_memory_db():
            pytest.skip("SQLite's WAL mode needs a database file")
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
    else:
        if connection.vendor == "mysql":
            level = "repeatable read"
        else:
            from django.db.backends.postgresql.psycopg_any import IsolationLevel

            level = IsolationLevel.REPEATABLE_READ
        settings_dict["OPTIONS"] = {**settings_dict.get("OPTIONS", {}), "isolation_level": level}
        # The level is set when a connection opens.
        connection.close()
    settings_dict["ATOMIC_REQUESTS"] = True
    yield
    settings_dict.update(saved)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=DELETE")
    connection.close()


def in_another_thread(func):
    """Run ``func`` on a connection of its own, which it commits on and then closes."""
    from django.db import connections

    errors = []

    def run():
        try:
            func()
        except Exception as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors


def test_a_job_deleted_while_its_first_poll_reads_it_in_a_snapshot_is_not_stored_again(
    api, user, store, hold, monkeypatch, requests_read_one_snapshot
):
    """With ``ATOMIC_REQUESTS``, the first poll's second read of the row ran in the request's
    own snapshot, which did not see a delete committed since its first: the job was stored
    again and polls showed the deleted job as pending for ``PROGRESS_CACHE_TIMEOUT``."""
    from task_ferry.api import views

    job = create(user, steps=2)
    read_row = views.visible_job

    def row_read_then_job_deleted_elsewhere(*args):
        found = read_row(*args)
        in_another_thread(lambda: Job.objects.filter(pk=job.pk).delete())
        return found

    monkeypatch.setattr(views, "visible_job", row_read_then_job_deleted_elsewhere)
    # The request's snapshot still has the job: it may show it this once.
    assert api.get(f"{URL}{job.pk}/").status_code in (200, 404)
    monkeypatch.setattr(views, "visible_job", read_row)
    assert store.read(job.pk) is None
    assert api.get(f"{URL}{job.pk}/").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_a_delete_rolled_back_to_a_savepoint_keeps_the_jobs_progress(api, user, store, hold):
    """A delete undone by a savepoint leaves the job, and so its progress in the store: the
    snapshots to forget were one list per transaction, so the store forgot this job too when
    the transaction committed, and polls read its row (0 %) until its progress moved."""
    from django.db import transaction

    gone = create(user, steps=2)
    kept = start(create(user, steps=4), percentage=50)
    with transaction.atomic():
        Job.objects.filter(pk=gone.pk).delete()
        with contextlib.suppress(RuntimeError), transaction.atomic():
            Job.objects.filter(pk=kept.pk).delete()
            raise RuntimeError("rolled back to the savepoint")
    assert api.get(f"{URL}{gone.pk}/").status_code == 404
    body = api.get(f"{URL}{kept.pk}/").json()
    assert (body["state"], body["progress_percentage"]) == ("started", 50)
