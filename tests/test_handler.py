import datetime
import functools
import logging
from decimal import Decimal

import pytest
from django.contrib.auth.models import AnonymousUser
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.utils import timezone

from task_ferry import signals
from task_ferry.exceptions import (
    InvalidJobValues,
    JobDoesNotExist,
    JobTypeDoesNotExist,
    MaxJobCountExceeded,
    MultipleJobTypesForModel,
    TaskFerryImproperlyConfigured,
)
from task_ferry.executors.immediate import ImmediateExecutor
from task_ferry.handler import JobHandler, transition
from task_ferry.models import Job, JobState
from task_ferry.registry import JobType
from task_ferry.stores.base import get_store
from tests.myapp.job_types import ExportJobType
from tests.myapp.models import ExportJob
from tests.registration import LinkedJobType, registered_for_the_test
from tests.testapp.job_types import LimitedJobType, RecordingJobType
from tests.testapp.models import (
    AnyJob,
    Attachment,
    AttachmentReceipt,
    HookCall,
    LimitedJob,
    LinkedJob,
    Marker,
    Receipt,
    ScriptedJob,
    ScriptedJobProxy,
)


def test_create_and_start_returns_the_saved_specific_job(db, user, no_dispatch):
    job = JobHandler.create_and_start(user, "export_table", table_id=7)
    assert isinstance(job, ExportJob)
    assert job.pk is not None
    assert (job.type, job.state, job.user, job.table_id) == ("export_table", "pending", user, 7)
    assert Job.objects.get(pk=job.pk).specific == job
    assert no_dispatch == [job.pk]


def test_a_job_created_through_the_orm_gets_its_type_and_content_type(db, user, no_dispatch):
    # As a test's factory (factory_boy) or a script makes one: IntegrityError on
    # content_type_id before.
    job = ExportJob.objects.create(user=user, table_id=3)
    assert (job.type, job.content_type) == (
        "export_table",
        ContentType.objects.get_for_model(ExportJob),
    )
    assert JobHandler.get_job(user, job.pk).specific == job
    assert job.state == "pending" and no_dispatch == []
    # Its type is named where several types share the model; a named one is kept.
    routed = ScriptedJob.objects.create(user=user, type="routed")
    assert Job.objects.get(pk=routed.pk).type == "routed"
    with pytest.raises(MultipleJobTypesForModel, match="^Several job types use the model "):
        ScriptedJob.objects.create(user=user)
    assert set(Job.objects.values_list("pk", flat=True)) == {job.pk, routed.pk}


@pytest.mark.parametrize(
    "job_type_class, values",
    [
        (ExportJobType, {"table_id": 7}),  # JobType, as the README writes it
        (LimitedJobType, {"label": "x"}),  # JobType[LimitedJob], through a generic base
    ],
)
def test_create_and_start_takes_the_job_type_class(db, user, no_dispatch, job_type_class, values):
    job = JobHandler.create_and_start(user, job_type_class, **values)
    assert type(job) is job_type_class.model_class
    assert job.type == job_type_class.type
    assert Job.objects.get(pk=job.pk).specific == job
    assert no_dispatch == [job.pk]
    # As the README passes the name.
    again = JobHandler.create_and_start(user=user, job_type_name=job_type_class, **values)
    assert (type(again), again.type) == (type(job), job.type)


def test_create_and_start_with_a_class_not_registered_creates_nothing(db, user, no_dispatch):
    class CopiedExportJobType(ExportJobType):  # inherits "export_table", registered to its parent
        pass

    with pytest.raises(JobTypeDoesNotExist) as info:
        JobHandler.create_and_start(user, CopiedExportJobType, table_id=1)
    assert str(info.value).startswith(
        "tests.test_handler.test_create_and_start_with_a_class_not_registered_creates_nothing."
        "<locals>.CopiedExportJobType is not a registered job type: its name 'export_table' is "
        "tests.myapp.job_types.ExportJobType's."
    )
    assert not Job.objects.exists()
    assert no_dispatch == []


def test_system_jobs_have_no_user(db, no_dispatch):
    job = JobHandler.create_and_start(None, "export_table", table_id=1)
    assert job.user is None
    assert JobHandler.get_job(None, job.pk) == job


def test_anonymous_user_is_rejected(db, no_dispatch):
    with pytest.raises(InvalidJobValues, match="authenticated user"):
        JobHandler.create_and_start(AnonymousUser(), "export_table", table_id=1)
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    "job_type_name, values, error, message",
    [
        ("nope", {"table_id": 1}, JobTypeDoesNotExist, "Known job types: .*'export_table'"),
        ("export_table", {}, InvalidJobValues, "table_id is required"),
        ("export_table", {"table_id": "many"}, InvalidJobValues, "table_id"),
        ("export_table", {"table_id": 1, "colour": "red"}, InvalidJobValues, "no field.*colour"),
        # A value named like the classmethod's own first parameter (a TypeError before).
        ("export_table", {"table_id": 1, "cls": None}, InvalidJobValues, "no field.*cls"),
        ("export_table", {"table_id": 1, "state": "finished"}, InvalidJobValues, "state"),
        ("scripted", {"steps": -1}, InvalidJobValues, "steps"),
        (
            "scripted",
            {"steps": float("inf")},
            InvalidJobValues,
            r"steps: Must be a whole number, got inf\.$",
        ),
        # Comparing a signalling NaN raises decimal.InvalidOperation inside Django's BooleanField.
        ("scripted", {"lock_own_row": Decimal("sNaN")}, InvalidJobValues, "lock_own_row: Dec"),
    ],
)
def test_bad_input_is_a_clear_error_and_creates_nothing(
    db, user, no_dispatch, job_type_name, values, error, message
):
    with pytest.raises(error, match=message):
        JobHandler.create_and_start(user, job_type_name, **values)
    assert not Job.objects.exists()
    assert no_dispatch == []


def test_an_arithmetic_error_of_the_models_own_clean_is_no_refusal_of_the_values(
    db, user, no_dispatch, monkeypatch
):
    # A bug in the type's code: a 400 "Invalid job values" would blame the caller and log nothing.
    def clean(self):
        return self.steps / 0

    monkeypatch.setattr(ScriptedJob, "clean", clean)
    with pytest.raises(ZeroDivisionError):
        JobHandler.create_and_start(user, "scripted", steps=3)
    assert not Job.objects.exists()
    assert no_dispatch == []


linked = registered_for_the_test(LinkedJobType)


def test_a_misspelt_name_is_refused_naming_it_the_fields_and_the_closest(db, user, no_dispatch):
    # The README's type returns the values it was given; scripted keeps JobType's default.
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "export_table", table_id=1, outptu_path="/tmp/x")
    assert str(refused.value) == (
        "'export_table' jobs have no field(s) 'outptu_path' (did you mean 'output_path'?). "
        "Their fields: table_id, output_path."
    )
    assert refused.value.errors == {"outptu_path": ["Unknown field. Did you mean 'output_path'?"]}

    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "scripted", stpes=3, colour="red")
    assert str(refused.value).startswith(
        "'scripted' jobs have no field(s) 'stpes' (did you mean 'steps'?), 'colour'. "
        "Their fields: steps, tick_delay, fail_at,"
    )
    assert refused.value.errors["colour"] == ["Unknown field."]
    assert not Job.objects.exists()


def test_a_misspelt_name_is_pointed_out_beside_the_error_prepare_values_raised(
    db, user, no_dispatch, monkeypatch
):
    # The README's prepare_values reports the field it missed, not the name given for it.
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "export_table", tabel_id=1)
    assert str(refused.value) == (
        "table_id is required. 'tabel_id' is not a field of 'export_table' jobs: did you mean "
        "'table_id'?"
    )
    # One that reads the value it needs raises a KeyError whose text is the bare key.
    monkeypatch.setattr(
        ExportJobType, "prepare_values", lambda self, values, user: {"table_id": values["table_id"]}
    )
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "export_table", tabel_id=1)
    assert str(refused.value) == (
        "No value for 'table_id' was given (ExportJobType.prepare_values raised KeyError). "
        "'tabel_id' is not a field of 'export_table' jobs: did you mean 'table_id'?"
    )
    assert not Job.objects.exists()


class PlainExportJobType(JobType[ExportJob]):
    """The README's model with JobType's own prepare_values, as a type is first written."""

    type = "plain_export"
    model_class = ExportJob

    def run(self, job, progress):
        progress.increment(100)


plain_export = registered_for_the_test(PlainExportJobType)


def test_a_required_value_not_given_is_said_to_be_required(db, user, no_dispatch, plain_export):
    # It read "table_id: This field cannot be null.", as if the caller had sent None.
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "plain_export")
    assert str(refused.value) == "Invalid job values. table_id: This field is required."
    # output_path, blank, needed no value.
    assert refused.value.errors == {"table_id": ["This field is required."]}
    # A None sent is refused as one.
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "plain_export", table_id=None)
    assert refused.value.errors == {"table_id": ["This field cannot be null."]}
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start_many(user, "plain_export", [{"table_id": 1}, {}])
    assert str(refused.value) == "Job 1: Invalid job values. table_id: This field is required."
    assert not Job.objects.exists()


def test_a_required_foreign_key_given_by_neither_name_is_said_to_be_required(
    db, user, no_dispatch, linked, monkeypatch
):
    field = LinkedJob._meta.get_field("marker")
    monkeypatch.setattr(field, "null", False)
    monkeypatch.setattr(field, "blank", False)
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "linked")
    assert refused.value.errors == {"marker": ["This field is required."]}
    for name in ["marker", "marker_id"]:
        with pytest.raises(InvalidJobValues) as refused:
            JobHandler.create_and_start(user, "linked", **{name: None})
        assert refused.value.errors == {"marker": ["This field cannot be null."]}


def test_a_value_prepare_values_fills_in_is_given(db, user, no_dispatch, plain_export, monkeypatch):
    monkeypatch.setattr(
        PlainExportJobType, "prepare_values", lambda self, values, user: {"table_id": None}
    )
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "plain_export")
    assert refused.value.errors == {"table_id": ["This field cannot be null."]}
    # One given that it drops was still given: the caller is not told to send it.
    monkeypatch.setattr(PlainExportJobType, "prepare_values", lambda self, values, user: {})
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "plain_export", table_id=3)
    assert refused.value.errors == {"table_id": ["This field cannot be null."]}


def test_a_required_value_of_a_blank_field_not_given_is_said_to_be_required(
    db, user, no_dispatch, plain_export, monkeypatch
):
    # full_clean() skips the None of a blank field; the check for the insert refused it.
    monkeypatch.setattr(ExportJob._meta.get_field("table_id"), "blank", True)
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "plain_export")
    assert refused.value.errors == {"table_id": ["This field is required."]}
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "plain_export", table_id=None)
    assert refused.value.errors == {"table_id": ["This field cannot be null."]}


class WordsJobType(RecordingJobType[LimitedJob]):
    """Takes ``words``, which is no field: prepare_values makes the label of them."""

    type = "words"
    model_class = LimitedJob

    def prepare_values(self, values, user):
        words = values.pop("words")
        if not words:
            raise ValueError("Give at least one word.")
        return {**values, "label": " ".join(words)}


words = registered_for_the_test(WordsJobType)


def test_prepare_values_may_take_names_that_are_no_field(db, user, no_dispatch, words):
    job = JobHandler.create_and_start(user, "words", words=["two", "words"])
    assert LimitedJob.objects.get(pk=job.pk).label == "two words"
    # Its own error is left as it is: the name it takes looks like no field.
    with pytest.raises(InvalidJobValues) as refused:
        JobHandler.create_and_start(user, "words", words=[])
    assert str(refused.value) == "Give at least one word."
    # What it leaves in the values is checked after it.
    with pytest.raises(InvalidJobValues, match=r"no field\(s\) 'lable' \(did you mean 'label'\?\)"):
        JobHandler.create_and_start(user, "words", words=["a"], lable="b")


@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
def test_an_unsaved_object_for_a_foreign_key_is_refused_naming_the_field(
    transactional_db, user, no_dispatch, linked, many
):
    def create(**values):
        if many:
            return JobHandler.create_and_start_many(user, "linked", [values])[0]
        return JobHandler.create_and_start(user, "linked", **values)

    # PostgreSQL stored the job without its marker; the other databases refused it with
    # Django's "save() prohibited to prevent data loss", which named no field.
    with pytest.raises(InvalidJobValues) as info:
        create(marker=Marker(name="unsaved"))
    assert info.value.errors == {
        "marker": ["This Marker is not saved yet: save it before creating the job."]
    }
    assert not Job.objects.exists()
    marker = Marker.objects.create(name="saved")
    assert LinkedJob.objects.get(pk=create(marker=marker).pk).marker == marker


def test_a_foreign_key_to_a_proxy_takes_a_row_of_its_concrete_model(db, user, no_dispatch, linked):
    scripted = JobHandler.create_and_start(user, "scripted")
    assert type(scripted) is ScriptedJob
    job = JobHandler.create_and_start(user, "linked", follows=scripted)
    assert LinkedJob.objects.get(pk=job.pk).follows_id == scripted.pk


def test_an_object_of_another_model_for_a_foreign_key_is_refused_naming_the_field(
    db, user, no_dispatch, linked
):
    # Django's own ValueError escaped JobHandler (a 500 in the API), naming no field.
    with pytest.raises(InvalidJobValues) as info:
        JobHandler.create_and_start(user, "linked", marker=user)
    assert info.value.errors == {
        "marker": [f"Must be a Marker instance (or its key as marker_id), got User {user!r}."]
    }
    assert not Job.objects.exists()


def test_a_many_to_many_field_takes_rows_or_keys_linked_once_the_job_is_saved(
    transactional_db, user, no_dispatch, linked, monkeypatch
):
    first, second = Marker.objects.create(name="first"), Marker.objects.create(name="second")
    # It said "'linked' jobs have no field(s) markers.", though they have.
    job = JobHandler.create_and_start(user, "linked", markers=[first, second])
    assert set(LinkedJob.objects.get(pk=job.pk).markers.all()) == {first, second}

    linked_when_created = []
    monkeypatch.setattr(
        LinkedJobType,
        "after_job_creation",
        lambda self, job, values: linked_when_created.append(set(job.markers.all())),
    )
    JobHandler.create_and_start(user, "linked", markers=[second.pk])
    assert linked_when_created == [{second}]
    jobs = JobHandler.create_and_start_many(
        user, "linked", [{"markers": [first.pk, second]}, {"markers": []}, {}]
    )
    assert [set(LinkedJob.objects.get(pk=j.pk).markers.all()) for j in jobs] == [
        {first, second},
        set(),
        set(),
    ]


@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
def test_values_a_many_to_many_field_cannot_take_are_refused_naming_it(
    transactional_db, user, no_dispatch, linked, many
):
    for value, message in [
        (5, "'int' object is not iterable"),
        ([user], f"Field 'id' expected a number but got {user!r}."),
    ]:
        with pytest.raises(InvalidJobValues) as info:
            if many:
                JobHandler.create_and_start_many(user, "linked", [{}, {"markers": value}])
            else:
                JobHandler.create_and_start(user, "linked", markers=value)
        assert info.value.errors == {"markers": [message]}
        assert str(info.value).startswith("Job 1: " if many else "Invalid job values. markers")
    assert not Job.objects.exists()


@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
@pytest.mark.parametrize("field", ["markers", "tags"])
def test_keys_no_row_has_for_a_many_to_many_field_are_refused_naming_it_on_every_database(
    transactional_db, user, no_dispatch, linked, many, field
):
    marker = Marker.objects.create(name="there")
    missing = marker.pk + 1000
    # MySQL and MariaDB linked the job to none of them without a word (Django adds links with
    # INSERT IGNORE), or through Tagging refused them naming no field, as PostgreSQL and
    # SQLite did at the commit.
    with pytest.raises(InvalidJobValues) as info:
        if many:
            JobHandler.create_and_start_many(user, "linked", [{field: [marker, missing]}])
        else:
            JobHandler.create_and_start(user, "linked", **{field: [marker, str(missing)]})
    assert info.value.errors == {field: [f"No Marker has id {missing}."]}
    assert not Job.objects.exists()
    job = JobHandler.create_and_start(user, "linked", **{field: [marker]})
    assert list(getattr(LinkedJob.objects.get(pk=job.pk), field).all()) == [marker]


def test_a_string_for_a_many_to_many_field_is_refused_not_read_as_keys(
    db, user, no_dispatch, linked
):
    first, second = Marker.objects.create(name="first"), Marker.objects.create(name="second")
    # Iterated character by character, "12" linked the job to the rows with keys 1 and 2.
    with pytest.raises(InvalidJobValues) as info:
        JobHandler.create_and_start(user, "linked", markers=f"{first.pk}{second.pk}")
    assert info.value.errors == {
        "markers": [f"Must be a list of rows or keys, got str '{first.pk}{second.pk}'."]
    }
    assert not Job.objects.exists()


@pytest.mark.parametrize("number", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_number_json_cannot_hold_is_refused_naming_the_field(
    transactional_db, user, no_dispatch, linked, number
):
    # Python's json writes NaN and Infinity, which every database's JSON refuses: PostgreSQL
    # with its SQL statement quoted, SQLite with "CHECK constraint failed", naming no field.
    with pytest.raises(InvalidJobValues) as info:
        JobHandler.create_and_start(user, "linked", details={"ratio": number})
    assert info.value.errors == {
        "details": ["NaN and infinite numbers cannot be stored as JSON: use None or a string."]
    }
    assert not Job.objects.exists()


def test_json_nested_too_deeply_is_refused_naming_the_field(
    transactional_db, user, no_dispatch, linked
):
    # A RecursionError out of full_clean() before. (Python 3.13's json takes 5,000 levels.)
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidJobValues) as info:
        JobHandler.create_and_start(user, "linked", details={"deep": deep})
    assert info.value.errors == {"details": ["Nested too deeply to be stored as JSON."]}
    assert str(info.value) == "Invalid job values. details: Nested too deeply to be stored as JSON."
    assert not Job.objects.exists()


@pytest.mark.parametrize("number", [float("nan"), float("-inf"), "Infinity"])
def test_a_float_field_refuses_numbers_json_cannot_show(
    transactional_db, user, no_dispatch, number
):
    # PostgreSQL stores them, and every API answer holding the job then failed (JSON has no
    # NaN): the user's job list with it. SQLite and MySQL refused them naming no field.
    with pytest.raises(InvalidJobValues) as info:
        JobHandler.create_and_start(user, "scripted", tick_delay=number)
    assert info.value.errors == {"tick_delay": [f"Must be a finite number, got {float(number)!r}."]}
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("values", "errors"),
    [
        (
            {"steps": 2.9},
            {
                "steps": [
                    "Must be a whole number, got 2.9. Round it first if that is what you mean."
                ]
            },
        ),
        (
            {"fail_at": Decimal("3.7")},
            {
                "fail_at": [
                    "Must be a whole number, got Decimal('3.7'). Round it first if that is what you mean."
                ]
            },
        ),
        (
            {"steps": True},
            {"steps": ["Must be a whole number, got True, which would be stored as 1."]},
        ),
    ],
    ids=["float", "decimal", "bool"],
)
def test_a_number_an_integer_field_would_cut_down_is_refused(
    transactional_db, user, no_dispatch, values, errors
):
    # Django's int() stored 2.9 as 2, without a word.
    with pytest.raises(InvalidJobValues) as info:
        JobHandler.create_and_start(user, "scripted", **values)
    assert info.value.errors == errors
    with pytest.raises(InvalidJobValues):
        JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}, values])
    assert not Job.objects.exists()
    # A whole number is one, whatever its type.
    job = JobHandler.create_and_start(user, "scripted", steps=3.0, fail_at=Decimal("7"))
    job.refresh_from_db()
    assert (job.steps, job.fail_at) == (3, 7)


def test_a_key_that_is_no_whole_number_links_no_row(transactional_db, user, no_dispatch, linked):
    # Django's int() made 1.5 the key of row 1, and True the key of row 1 too.
    first = Marker.objects.create(name="first")
    for values, field in [
        ({"marker_id": first.pk + 0.5}, "marker"),
        ({"markers": [float(first.pk), first.pk + 0.5]}, "markers"),
        ({"markers": [True]}, "markers"),
    ]:
        with pytest.raises(InvalidJobValues) as info:
            JobHandler.create_and_start(user, "linked", **values)
        [message] = info.value.errors[field]
        assert message.startswith("Must be a whole number, got ")
    assert not Job.objects.exists()
    job = JobHandler.create_and_start(user, "linked", marker_id=float(first.pk))
    assert job.specific.marker == first


def test_invalid_values_error_is_a_value_error_with_field_errors(db, user, no_dispatch):
    with pytest.raises(ValueError) as info:
        JobHandler.create_and_start(user, "export_table", table_id="many")
    assert "table_id" in info.value.errors


def test_max_count_limits_unfinished_jobs_per_user_and_type(db, user, other_user, no_dispatch):
    JobHandler.create_and_start(user, "limited")
    JobHandler.create_and_start(user, "limited")
    with pytest.raises(MaxJobCountExceeded, match="2 unfinished 'limited'") as info:
        JobHandler.create_and_start(user, "limited")
    assert info.value.max_count == 2
    assert LimitedJob.objects.filter(user=user).count() == 2
    # Other users and other types are independent.
    JobHandler.create_and_start(other_user, "limited")
    JobHandler.create_and_start(user, "scripted")


def test_max_count_with_the_lazy_user_of_a_session_request(db, user, no_dispatch):
    # AuthenticationMiddleware hands views request.user as a SimpleLazyObject.
    from django.utils.functional import SimpleLazyObject

    lazy_user = SimpleLazyObject(lambda: user)
    JobHandler.create_and_start(lazy_user, "limited")
    JobHandler.create_and_start(lazy_user, "limited")
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start(lazy_user, "limited")


def test_ended_jobs_free_their_max_count_slot(db, user, no_dispatch):
    first = JobHandler.create_and_start(user, "limited")
    JobHandler.create_and_start(user, "limited")
    JobHandler.cancel(user, first.pk)
    JobHandler.create_and_start(user, "limited")
    assert LimitedJob.objects.live().count() == 2


def test_global_default_max_count(db, user, no_dispatch, settings):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "MAX_JOBS_PER_USER_PER_TYPE": 1}
    JobHandler.create_and_start(user, "scripted")
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start(user, "scripted")
    # A type's own max_count wins over the default.
    JobHandler.create_and_start(user, "limited")
    JobHandler.create_and_start(user, "limited")


def test_get_job_hides_other_users_jobs_and_malformed_ids(db, user, other_user, no_dispatch):
    job = JobHandler.create_and_start(user, "export_table", table_id=1)
    assert JobHandler.get_job(user, str(job.pk)) == job
    for who, job_id in [
        (other_user, job.pk),
        (None, job.pk),
        (AnonymousUser(), job.pk),
        (user, "abc"),
        (user, "1.5"),
        (user, -job.pk),
        (user, None),
        (user, True),
        (user, 2**80),
    ]:
        with pytest.raises(JobDoesNotExist):
            JobHandler.get_job(who, job_id)


def test_get_jobs_for_user_newest_first(db, user, other_user, no_dispatch):
    old = JobHandler.create_and_start(user, "scripted")
    Job.objects.filter(pk=old.pk).update(created_at=timezone.now() - datetime.timedelta(hours=1))
    new = JobHandler.create_and_start(user, "export_table", table_id=1)
    JobHandler.create_and_start(other_user, "scripted")
    assert list(JobHandler.get_jobs_for_user(user)) == [
        Job.objects.get(pk=new.pk),
        Job.objects.get(pk=old.pk),
    ]


def test_specific_yields_each_job_as_its_types_model_in_one_query(
    db, user, no_dispatch, django_assert_num_queries
):
    scripted = JobHandler.create_and_start(user, "scripted", steps=2)
    export = JobHandler.create_and_start(user, "export_table", table_id=4)
    # Its type since removed from the code: a plain Job, as Job.specific gives one.
    removed = ScriptedJob.objects.create(user=user, type="removed_from_the_code")
    with django_assert_num_queries(1):
        jobs = list(JobHandler.get_jobs_for_user(user).specific())
        assert [(type(job), job.pk) for job in jobs] == [
            (Job, removed.pk),
            (ExportJob, export.pk),
            (ScriptedJob, scripted.pk),
        ]
        assert (jobs[1].table_id, jobs[2].steps) == (4, 2)
    # It composes with the rest of a queryset.
    assert list(JobHandler.get_jobs_for_user(user).specific().filter(type="export_table")) == [
        export
    ]


def test_cancel_pending_job_runs_on_cancelled_once(
    db, user, no_dispatch, django_capture_on_commit_callbacks
):
    job = JobHandler.create_and_start(user, "scripted")
    # Under `db` nothing commits: the hook runs when the (test's) transaction would.
    with django_capture_on_commit_callbacks(execute=True):
        JobHandler.cancel(user, job.pk)
        JobHandler.cancel(user, job.pk)
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert job.finished_at is not None
    assert HookCall.objects.filter(job_id=job.pk, hook="on_cancelled").count() == 1


class RolledBack(Exception):
    pass


@pytest.fixture
def cancelled_signals():
    sent = []

    def receiver(sender, job, **kwargs):
        sent.append((job.pk, job.state))

    signals.job_cancelled.connect(receiver)
    yield sent
    signals.job_cancelled.disconnect(receiver)


def test_a_pending_job_cancelled_in_a_transaction_that_rolls_back_is_announced_nowhere(
    transactional_db, user, no_dispatch, cancelled_signals
):
    # A view under ATOMIC_REQUESTS that fails after the cancel, say. The store said
    # "cancelled", the hook and the signal had run, and the row was pending: a worker ran it.
    job = JobHandler.create_and_start(user, "scripted", marker="ran")
    store = get_store()
    with pytest.raises(RolledBack), transaction.atomic():
        JobHandler.cancel(user, job.pk)
        raise RolledBack
    assert Job.objects.get(pk=job.pk).state == "pending"
    assert store.read(job.pk) is None
    assert not HookCall.objects.exists()
    assert cancelled_signals == []
    # The job is still there to run, and runs.
    assert JobHandler.run_job(job.pk) is not None
    assert Marker.objects.filter(name="ran").exists()
    assert store.read(job.pk)["state"] == "finished"


def test_a_pending_job_cancelled_in_a_transaction_is_announced_when_it_commits(
    transactional_db, user, no_dispatch, cancelled_signals
):
    job = JobHandler.create_and_start(user, "scripted")
    store = get_store()
    with transaction.atomic():
        assert JobHandler.cancel(user, job.pk).state == "cancelled"
        assert store.read(job.pk) is None
        assert not HookCall.objects.exists()
        assert cancelled_signals == []
    assert store.read(job.pk)["state"] == "cancelled"
    assert list(HookCall.objects.values_list("job_id", "hook")) == [(job.pk, "on_cancelled")]
    assert cancelled_signals == [(job.pk, "cancelled")]


def test_a_pending_job_cancelled_in_a_savepoint_rolled_back_is_announced_nowhere(
    transactional_db, user, no_dispatch, cancelled_signals
):
    job = JobHandler.create_and_start(user, "scripted")
    with transaction.atomic(), pytest.raises(RolledBack), transaction.atomic():
        JobHandler.cancel(user, job.pk)
        raise RolledBack
    assert Job.objects.get(pk=job.pk).state == "pending"
    assert get_store().read(job.pk) is None
    assert not HookCall.objects.exists()
    assert cancelled_signals == []


def test_a_request_to_stop_a_running_job_goes_at_once_even_if_the_transaction_rolls_back(
    transactional_db, user, no_dispatch
):
    # No row is written for it: the job's own run records its end, in its own transaction.
    job = JobHandler.create_and_start(user, "scripted")
    assert transition(job, JobState.STARTED, from_states=[JobState.PENDING])
    with pytest.raises(RolledBack), transaction.atomic():
        JobHandler.cancel(user, job.pk)
        assert get_store().is_cancel_requested(job.pk)
        raise RolledBack
    assert get_store().is_cancel_requested(job.pk)
    assert Job.objects.get(pk=job.pk).state == "started"


def test_a_cancelled_job_is_never_run(db, user, no_dispatch):
    job = JobHandler.create_and_start(user, "scripted", marker="ran")
    JobHandler.cancel(user, job.pk)
    assert JobHandler.run_job(job.pk) is None
    assert not Marker.objects.exists()
    assert ScriptedJob.objects.get(pk=job.pk).state == "cancelled"


def test_cancelling_an_ended_job_changes_nothing(db, user):
    job = JobHandler.create_and_start(user, "scripted")
    assert job.state == "finished"
    assert JobHandler.cancel(user, job.pk).state == "finished"
    assert not HookCall.objects.exists()


def test_cannot_cancel_someone_elses_job(db, user, other_user, no_dispatch):
    job = JobHandler.create_and_start(user, "scripted")
    with pytest.raises(JobDoesNotExist):
        JobHandler.cancel(other_user, job.pk)
    assert Job.objects.get(pk=job.pk).state == "pending"


def test_cancel_job_given_an_id_says_how_to_cancel_by_id(db, user, no_dispatch):
    job = JobHandler.create_and_start(user, "scripted")
    with pytest.raises(TypeError, match=r"JobHandler\.cancel\(user, job_id\)"):
        JobHandler.cancel_job(job.pk)
    assert Job.objects.get(pk=job.pk).state == "pending"
    assert JobHandler.cancel_job(job).state == "cancelled"


def test_cancel_job_of_an_instance_read_before_the_job_moved_on(db, user, no_dispatch):
    # Read while pending; since then ended, deleted, or taken by a worker. It answered
    # "pending" for all three, and stored a cancel request for a job that had ended or was gone.
    store = get_store()
    ended, gone, taken = (JobHandler.create_and_start(user, "scripted") for _ in range(3))
    stale = {job.pk: Job.objects.get(pk=job.pk) for job in (ended, gone, taken)}
    transition(ended, JobState.FINISHED, from_states=["pending"])
    Job.objects.filter(pk=gone.pk).delete()
    transition(taken, JobState.STARTED, from_states=["pending"])

    assert JobHandler.cancel_job(stale[ended.pk]).state == "finished"
    assert not store.is_cancel_requested(ended.pk)
    with pytest.raises(JobDoesNotExist):
        JobHandler.cancel_job(stale[gone.pk])
    assert not store.is_cancel_requested(gone.pk)
    assert JobHandler.cancel_job(stale[taken.pk]).state == "started"
    assert store.is_cancel_requested(taken.pk)


def test_cancel_job_of_an_unsaved_job_says_it_is_not_saved(db):
    with pytest.raises(
        ValueError, match="^cancel_job\\(\\) takes a saved job; this ExportJob has no id"
    ):
        JobHandler.cancel_job(ExportJob(table_id=1))


def test_cancel_given_a_job_instead_of_its_id_says_to_pass_the_id(db, user, no_dispatch):
    job = JobHandler.create_and_start(user, "scripted")
    with pytest.raises(TypeError, match=r"job_id takes the job's id \(job\.pk\), not a Job"):
        JobHandler.cancel(user, job)
    with pytest.raises(TypeError, match=r"cancel_job\(job\)"):
        JobHandler.cancel(user, job)
    with pytest.raises(TypeError, match=r"job's id"):
        JobHandler.get_job(user, job)
    assert Job.objects.get(pk=job.pk).state == "pending"
    assert JobHandler.cancel(user, job.pk).state == "cancelled"


def test_create_and_start_with_an_executor_that_cannot_be_loaded_writes_no_job(db, user, settings):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "EXECUTOR": "task_ferry.executors.Celery"}
    with pytest.raises(TaskFerryImproperlyConfigured, match="cannot be imported"):
        JobHandler.create_and_start(user, "scripted")
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("store", "cause"),
    [
        ({"PROGRESS_STORE": "myproject.stores.Nope"}, "No module named 'myproject'"),
        ({"PROGRESS_STORE": None, "REDIS_URL": "localhost:6379"}, "Redis URL must specify"),
    ],
    ids=["PROGRESS_STORE", "REDIS_URL"],
)
def test_create_and_start_with_a_store_that_cannot_be_built_writes_no_job(
    transactional_db, user, settings, store, cause
):
    # pytest-django and web servers run no system checks (E006). The job ran, and then the
    # caller got a bare ModuleNotFoundError, and another job if it tried again.
    settings.TASK_FERRY = {**settings.TASK_FERRY, **store}
    for create in (
        lambda: JobHandler.create_and_start(user, "scripted", steps=1),
        lambda: JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}]),
    ):
        with pytest.raises(TaskFerryImproperlyConfigured) as info:
            create()
        assert cause in str(info.value)
        assert str(info.value).endswith(
            "Fix TASK_FERRY's PROGRESS_STORE or REDIS_URL (`python manage.py check` says which)."
        )
    assert not Job.objects.exists()


def test_an_executor_path_that_does_not_import_says_how_to_fix_it(db, user, settings):
    # pytest-django runs no system checks: this error is all a test run shows of E001.
    settings.TASK_FERRY = {
        **settings.TASK_FERRY,
        "EXECUTOR": "task_ferry.executors.ImmediateExecutor",
    }
    with pytest.raises(TaskFerryImproperlyConfigured) as info:
        JobHandler.create_and_start(user, "scripted")
    # It advised installing an extra, for a path that misses a module.
    assert "extra" not in str(info.value)
    assert str(info.value).endswith(
        "Fix the dotted path. The executors are "
        "task_ferry.executors.immediate.ImmediateExecutor, "
        "task_ferry.executors.celery.CeleryExecutor and "
        "task_ferry.executors.django_tasks.DjangoTasksExecutor."
    )


def test_handles_from_get_job_follow_state_changes(db, user, no_dispatch):
    job = JobHandler.create_and_start(user, "scripted")
    looked_up = JobHandler.get_job(user, job.pk)
    JobHandler.cancel(user, job.pk)
    assert job.state == looked_up.state == "cancelled"


def _age(job, days):
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - datetime.timedelta(days=days))


def test_cleanup_deletes_only_ended_jobs_past_expiry(db, user, no_dispatch):
    finished_old = JobHandler.create_and_start(user, "scripted")
    JobHandler.run_job(finished_old.pk)
    cancelled_old = JobHandler.create_and_start(user, "scripted")
    JobHandler.cancel(user, cancelled_old.pk)
    finished_recent = JobHandler.create_and_start(user, "scripted")
    JobHandler.run_job(finished_recent.pk)
    pending_old = JobHandler.create_and_start(user, "scripted")
    Job.objects.filter(pk=pending_old.pk).update(
        created_at=timezone.now() - datetime.timedelta(days=30)
    )
    _age(finished_old, 8)
    _age(cancelled_old, 30)
    _age(finished_recent, 6)

    assert JobHandler.cleanup_old_jobs() == 2

    assert set(Job.objects.values_list("pk", flat=True)) == {finished_recent.pk, pending_old.pk}
    assert not ScriptedJob.objects.filter(pk__in=[finished_old.pk, cancelled_old.pk]).exists()
    calls = HookCall.objects.filter(hook="before_delete")
    assert sorted(calls.values_list("job_id", flat=True)) == sorted(
        [finished_old.pk, cancelled_old.pk]
    )


def clean_up_twice_keeping(kept, deleted, caplog, model, protecting_key):
    """Expire both jobs and clean up twice: the first deletes ``deleted`` alone, the second
    nothing, each saying once that ``kept`` is kept. Returns the ids of the jobs whose
    before_delete ran."""
    _age(kept, 30)
    _age(deleted, 30)
    with caplog.at_level(logging.WARNING, logger="task_ferry"):
        assert JobHandler.cleanup_old_jobs() == 1
        assert JobHandler.cleanup_old_jobs() == 0
    assert list(Job.objects.values_list("pk", flat=True)) == [kept.pk]
    kept_message = (
        f"cleanup_old_jobs: job {kept.pk} is kept: Cannot delete some instances of model "
        f"{model} because they are referenced through protected foreign keys: {protecting_key}."
    )
    assert caplog.messages.count(kept_message) == 2
    calls = HookCall.objects.filter(hook="before_delete").values_list("job_id", flat=True)
    return sorted(calls)


@pytest.mark.parametrize("protected_by", ["a receipt", "its before_delete"])
def test_cleanup_keeps_a_job_a_protecting_foreign_key_points_at_and_deletes_the_rest(
    db, user, linked, monkeypatch, caplog, protected_by
):
    kept, deleted = (JobHandler.create_and_start(user, "linked") for _ in range(2))
    if protected_by == "a receipt":
        Receipt.objects.create(job=kept)
    else:
        before_delete = LinkedJobType.before_delete

        def keep_receipt(self, job):
            before_delete(self, job)
            if job.pk == kept.pk:
                Receipt.objects.create(job=job)

        monkeypatch.setattr(LinkedJobType, "before_delete", keep_receipt)

    # Django's ProtectedError stopped every clean-up at the job's batch, after calling the
    # before_delete of each job in it, again at each clean-up.
    hooked = clean_up_twice_keeping(kept, deleted, caplog, "'LinkedJob'", "'Receipt.job'")
    assert hooked == sorted([deleted.pk] + ([kept.pk] if protected_by != "a receipt" else []))
    # A kept job has its LinkedJob row: it was also taken for one without it, logged as
    # "no row in LinkedJob's table; deleting the job without its before_delete hook" and
    # tried again through Job, whose refusal then named 'LinkedJob.job_ptr' as the reason.
    assert not [m for m in caplog.messages if "no row in" in m or "LinkedJob.job_ptr" in m]


def test_cleanup_calls_no_before_delete_for_a_job_protected_through_a_cascade(db, user, caplog):
    kept, deleted = (JobHandler.create_and_start(user, "limited") for _ in range(2))
    # The job's attachment is deleted with it, but a receipt keeps the attachment.
    AttachmentReceipt.objects.create(attachment=Attachment.objects.create(job=kept))
    # Only a foreign key to the job's own model was looked for: the kept job's before_delete
    # ran at each clean-up, which kept the job all the same.
    hooked = clean_up_twice_keeping(kept, deleted, caplog, "'LimitedJob'", "'Attachment.job'")
    assert hooked == [deleted.pk]


def test_cleanup_asks_the_store_to_forget_each_deleted_job_once(
    transactional_db, user, no_dispatch, monkeypatch
):
    """The ``post_delete`` receiver forgets deleted jobs once their delete commits; the cleanup
    forgot each batch a second time, one more store call (a wait more, with the store down)."""
    from task_ferry.stores.base import get_store

    jobs = [JobHandler.create_and_start(user, "scripted") for _ in range(3)]
    for job in jobs:
        JobHandler.run_job(job.pk)
        _age(job, 8)
    store = get_store()
    assert all(store.read(job.pk) for job in jobs)
    forgotten = []
    delete = type(store).delete

    def counted_delete(self, job_ids):
        forgotten.append(sorted(job_ids))
        delete(self, job_ids)

    monkeypatch.setattr(type(store), "delete", counted_delete)
    assert JobHandler.cleanup_old_jobs() == 3
    assert forgotten == [sorted(job.pk for job in jobs)]
    assert not any(store.read(job.pk) for job in jobs)


class FieldlessJobType(JobType):
    """A type without fields of its own: its model is a proxy of ``Job``, its jobs have no row
    but their ``Job`` row."""

    type = "fieldless"
    model_class = AnyJob

    def run(self, job, progress):
        progress.increment(100)


fieldless = registered_for_the_test(FieldlessJobType)


def test_deletes_through_proxies_forget_each_job_once(
    transactional_db, user, no_dispatch, fieldless, monkeypatch
):
    """A delete through a proxy of ``Job`` sends ``post_delete`` with the proxy as its sender:
    the receiver, connected for ``Job`` alone, never ran for a job without a row of its type's
    own (a type whose model is that proxy), and polls and streams kept showing the job for
    ``PROGRESS_CACHE_TIMEOUT``. A job with such a row, deleted through the proxy, gets the
    signal for ``Job`` as well, and a proxy of a job type's model sends it for ``Job``
    alone: each job is forgotten once."""
    from django.db import transaction

    from task_ferry.stores.base import get_store

    jobs = [JobHandler.create_and_start(user, "fieldless") for _ in range(2)]
    jobs += [JobHandler.create_and_start(user, "scripted") for _ in range(3)]
    for job in jobs:
        JobHandler.run_job(job.pk)
    store = get_store()
    assert all(store.read(job.pk)["state"] == "finished" for job in jobs)
    forgotten = []
    delete = type(store).delete

    def counted_delete(self, job_ids):
        forgotten.append(list(job_ids))
        delete(self, job_ids)

    monkeypatch.setattr(type(store), "delete", counted_delete)
    with transaction.atomic():
        AnyJob.objects.filter(pk=jobs[0].pk).delete()
        AnyJob.objects.get(pk=jobs[1].pk).delete()
        AnyJob.objects.filter(pk=jobs[2].pk).delete()
        ScriptedJobProxy.objects.get(pk=jobs[3].pk).delete()
        ScriptedJobProxy.objects.filter(pk=jobs[4].pk).delete()
    assert not Job.objects.exists()
    assert len(forgotten) == 1
    assert sorted(forgotten[0]) == [job.pk for job in jobs]
    assert not any(store.read(job.pk) for job in jobs)


class ScanCountingList(list):
    """``connection.run_on_commit``, counting the backward scans of it."""

    scans = 0

    def __reversed__(self):
        type(self).scans += 1
        return super().__reversed__()


def test_a_delete_of_many_jobs_beside_a_callback_per_row_of_its_own_scans_once(
    transactional_db, user, no_dispatch, monkeypatch
):
    """A project's own receiver that registers an on-commit callback per deleted row (delete
    the job's file once committed, say) put a callback between each job's and the one that
    forgets them all: each job's signal scanned back past every one of them, and a delete of
    20,000 jobs took 9 s of Python inside its transaction."""
    from django.db import transaction
    from django.db.models.signals import post_delete

    from task_ferry.stores.base import get_store

    jobs = [JobHandler.create_and_start(user, "scripted") for _ in range(200)]
    store = get_store()
    for job in jobs:
        JobHandler.run_job(job.pk)
    files_removed = []

    def remove_file_on_commit(sender, instance, **kwargs):
        transaction.on_commit(functools.partial(files_removed.append, instance.pk))

    post_delete.connect(remove_file_on_commit, sender=Job, dispatch_uid="test.remove_file")
    forgotten = []
    delete = type(store).delete
    monkeypatch.setattr(
        type(store), "delete", lambda self, ids: (forgotten.append(set(ids)), delete(self, ids))
    )
    try:
        with transaction.atomic():
            connection.run_on_commit = ScanCountingList()
            Job.objects.filter(pk__in=[job.pk for job in jobs]).delete()
            scans = ScanCountingList.scans
    finally:
        post_delete.disconnect(sender=Job, dispatch_uid="test.remove_file")
    assert scans <= 1
    assert forgotten == [{job.pk for job in jobs}]
    assert sorted(files_removed) == sorted(job.pk for job in jobs)
    assert not any(store.read(job.pk) for job in jobs)


def test_a_proxy_of_job_defined_late_is_watched_and_other_models_keep_fast_deletes(db):
    """A proxy of ``Job`` defined after the apps are ready (in a ``job_types.py`` module) is
    watched as well. Other models get no receiver: with one, Django would load their rows
    before deleting them and send signals for each."""
    from django.db.models.signals import post_delete
    from django.test.utils import CaptureQueriesContext, isolate_apps

    with isolate_apps("tests.testapp"):

        class LateJob(Job):
            class Meta:
                proxy = True
                app_label = "testapp"

        class LateScriptedJob(ScriptedJob):
            class Meta:
                proxy = True
                app_label = "testapp"

    try:
        assert post_delete.has_listeners(LateJob)
        assert not post_delete.has_listeners(LateScriptedJob)
    finally:
        # A signal keys its receivers by the sender's id, which a later class could reuse.
        post_delete.disconnect(sender=LateJob, dispatch_uid="task_ferry.forget")
    assert not post_delete.has_listeners(HookCall)
    HookCall.objects.bulk_create(HookCall(job_id=i, hook="h") for i in range(3))
    with CaptureQueriesContext(connection) as queries:
        assert HookCall.objects.all().delete()[0] == 3
    assert len(queries) == 1


def test_cleanup_honours_job_expiry_days(db, user, settings):
    job = JobHandler.create_and_start(user, "scripted")
    _age(job, 3)
    assert JobHandler.cleanup_old_jobs() == 0
    settings.TASK_FERRY = {**settings.TASK_FERRY, "JOB_EXPIRY_DAYS": 2}
    assert JobHandler.cleanup_old_jobs() == 1


def test_live_handles_do_not_keep_jobs_alive(transactional_db, user, no_dispatch):
    import gc
    import weakref

    from task_ferry.handler import live_handles

    # Committed for real: no on-commit callback is left holding the job.
    job = JobHandler.create_and_start(user, "scripted")
    ref = weakref.ref(job)
    job_id = job.pk
    del job
    gc.collect()
    assert ref() is None
    live_handles._prune()
    assert job_id not in live_handles._refs


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's one-statement insert")
def test_a_job_created_outside_a_transaction_is_saved_like_model_save(
    transactional_db, monkeypatch
):
    from django.db.models.signals import post_save

    monkeypatch.setattr(ImmediateExecutor, "enqueue", lambda self, job_id: None)
    job = JobHandler.create_and_start(None, "scripted", steps=3, marker="one-statement")

    loaded = ScriptedJob.objects.get(pk=job.pk)
    for field in ScriptedJob._meta.concrete_fields:
        assert getattr(job, field.attname) == getattr(loaded, field.attname), field.name
    assert loaded.state == JobState.PENDING and loaded.steps == 3
    assert loaded.content_type_id == ContentType.objects.get_for_model(ScriptedJob).pk
    # The instance is a saved one: saving it again updates its own fields.
    job.result = "saved again"
    job.save()
    assert ScriptedJob.objects.get(pk=job.pk).result == "saved again"

    # Save signal receivers still hear about new jobs.
    saved = []

    def receiver(sender, instance, created, **kwargs):
        saved.append((instance.pk, created))

    post_save.connect(receiver, sender=ScriptedJob)
    try:
        other = JobHandler.create_and_start(None, "scripted", steps=1)
    finally:
        post_save.disconnect(receiver, sender=ScriptedJob)
    assert saved == [(other.pk, True)]


@pytest.mark.parametrize("job_type_name", ["scripted", "limited"])
def test_a_job_for_a_user_deleted_meanwhile_is_a_clear_error(
    transactional_db, no_dispatch, django_user_model, job_type_name
):
    # Committed for real: PostgreSQL checks the user's key at the commit, MySQL at the insert.
    gone = django_user_model.objects.create_user("gone")
    stale = django_user_model.objects.get(pk=gone.pk)
    gone.delete()

    with pytest.raises(InvalidJobValues, match=f"User {stale.pk} does not exist"):
        JobHandler.create_and_start(stale, job_type_name)
    assert not Job.objects.exists()
    assert no_dispatch == []
