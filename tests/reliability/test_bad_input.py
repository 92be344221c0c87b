"""Arbitrary input to the public Python surface: the handler, the registry and Progress. Every
case either works or raises a clear error (a TaskFerryError or ValueError), and the database is
left consistent: no job row without its type's row, nothing created by a rejected call."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F
from django.db.models.expressions import DatabaseDefault
from django.test.utils import isolate_apps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from task_ferry import creation
from task_ferry.exceptions import InvalidJobValues, JobDoesNotExist, TaskFerryError
from task_ferry.handler import JobHandler
from task_ferry.models import Job, JobState
from task_ferry.progress import Progress
from task_ferry.registry import JobType, JobTypeRegistry, job_type_registry
from tests.api.helpers import client_for
from tests.testapp.job_types import LimitedJobType
from tests.testapp.models import LimitedJob, ScriptedJob

pytestmark = pytest.mark.django_db

CLEAR_ERRORS = (TaskFerryError, ValueError)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.decimals()
    | st.text()
    | st.binary()
    | st.datetimes()
    | st.dates()
    | st.timedeltas(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.decimals()
    | st.fractions()
    | st.booleans()
    | st.none()
    | st.text(max_size=5)
    | st.just(complex(1, 1))
)
# "user" and "job_type_name" are create_and_start's own parameters: Python itself rejects them.
field_names = (
    st.sampled_from(
        [f.name for f in ScriptedJob._meta.get_fields()]
        + [f.attname for f in ScriptedJob._meta.concrete_fields]
        + ["pk", "label", "table_id"]
    )
    | st.text(min_size=1, max_size=12)
).filter(lambda k: k not in ("user", "job_type_name"))
job_ids = anything | st.sampled_from(["1", " 1 ", "1.0", "\uff11", "-1", "0", "9" * 30, "1e3"])


def consistent(*, cancelled: int | None = None) -> tuple[int, int]:
    """Every job row has its type's row and is pending (nothing here runs jobs), but the job
    ``cancelled``, which the caller had the right to cancel."""
    jobs = Job.objects.count()
    own_rows = ScriptedJob.objects.count() + LimitedJob.objects.count()
    assert jobs == own_rows
    assert not Job.objects.exclude(state=JobState.PENDING).exclude(pk=cancelled).exists()
    if cancelled is not None:
        assert Job.objects.get(pk=cancelled).state == JobState.CANCELLED
    return jobs, own_rows


@pytest.fixture
def users(user):
    unsaved = get_user_model()(username="unsaved")
    deleted = get_user_model().objects.create_user("deleted")
    deleted_copy = get_user_model().objects.get(pk=deleted.pk)
    deleted.delete()
    return [user, None, AnonymousUser(), unsaved, deleted_copy, object(), "alice", 1]


# Cases tried per sweep; the reliability conftest prints them in the test summary.
counter = {"create": 0, "lookup": 0, "registry": 0, "progress": 0}


@FUZZ
@given(
    user_index=st.integers(min_value=0, max_value=7),
    job_type_name=st.sampled_from(["scripted", "limited", "routed"]) | anything,
    values=st.dictionaries(field_names, anything, max_size=4),
)
def test_create_and_start_with_arbitrary_input(queueing, users, user_index, job_type_name, values):
    counter["create"] += 1
    before = consistent()
    user = users[user_index]
    try:
        job = JobHandler.create_and_start(user, job_type_name, **values)
    except CLEAR_ERRORS as exc:
        assert str(exc)
        assert consistent() == before
        return
    assert consistent()[0] == before[0] + 1
    assert Job.objects.get(pk=job.pk).type == job_type_name
    job.delete()


@FUZZ
@given(
    user_index=st.integers(min_value=0, max_value=7),
    job_type_name=st.sampled_from(["scripted", "limited"]) | anything,
    values_list=st.lists(st.dictionaries(field_names, anything, max_size=3) | anything, max_size=4),
)
def test_create_and_start_many_with_arbitrary_input(
    queueing, users, user_index, job_type_name, values_list
):
    counter["create"] += 1
    before = consistent()
    user = users[user_index]
    try:
        jobs = JobHandler.create_and_start_many(user, job_type_name, values_list)
    except CLEAR_ERRORS as exc:
        assert str(exc)
        # All or nothing.
        assert consistent() == before
        return
    assert consistent()[0] == before[0] + len(values_list) == before[0] + len(jobs)
    assert all(Job.objects.get(pk=job.pk).type == job_type_name for job in jobs)
    for job in jobs:
        job.delete()


# Stands for the id of the example's own job, spelled as an int, a str or a float.
OWN_ID = object()


@FUZZ
@given(
    job_id=job_ids | st.sampled_from([int, str, float]).map(lambda spelling: (OWN_ID, spelling)),
    user_index=st.integers(min_value=0, max_value=7),
)
def test_lookup_and_cancel_with_arbitrary_ids(queueing, users, user_index, job_id):
    counter["lookup"] += 1
    own = JobHandler.create_and_start(users[0], "scripted")
    if isinstance(job_id, tuple) and job_id[0] is OWN_ID:
        job_id = job_id[1](own.pk)
    try:
        before = consistent()
        user = users[user_index]
        reached_own = False
        for call in (JobHandler.get_job, JobHandler.cancel):
            try:
                job = call(user, job_id)
            except CLEAR_ERRORS as exc:
                assert str(exc)
            else:
                # Only a well-formed id of the caller's own job gets through.
                assert job.pk == own.pk and user is users[0]
                reached_own = True
        # The owner may cancel their job (ids are small on SQLite, so the fuzzer finds it too).
        assert consistent(cancelled=own.pk if reached_own else None)[0] == before[0]
    finally:
        # Also when this example fails: a cancelled leftover would fail the next example's
        # consistency check and hide this example's own error.
        Job.objects.filter(pk=own.pk).delete()


class ValidType(JobType):
    type = "fuzz_valid"
    model_class = ScriptedJob


registrable = (
    anything
    | st.sampled_from([JobType, ValidType, ValidType(), int, object, Job, ScriptedJob, type])
    | st.builds(
        lambda name, model: type("Fuzzed", (JobType,), {"type": name, "model_class": model}),
        anything,
        st.sampled_from([ScriptedJob, Job, int, None, "x"]),
    )
)


@FUZZ
@given(thing=registrable, lookup=anything | st.sampled_from(["scripted", ScriptedJob, Job]))
def test_registry_with_arbitrary_input(thing, lookup):
    counter["registry"] += 1
    registry = JobTypeRegistry()
    registry.register(ValidType)
    names = registry.names()
    try:
        registered = registry.register(thing)
    except CLEAR_ERRORS as exc:
        assert str(exc)
        assert registry.names() == names
    else:
        assert isinstance(registered, JobType)
        assert registered.type in registry
    global_names = job_type_registry.names()
    for call in (registry.get, registry.get_by_model, registry.unregister, job_type_registry.get):
        try:
            call(lookup)
        except CLEAR_ERRORS as exc:
            assert str(exc)
    assert job_type_registry.names() == global_names


def assert_readable(*nodes: Progress) -> None:
    for node in nodes:
        assert 0 <= node.percentage <= 100
        assert isinstance(node.percentage, int)
        assert isinstance(node.state, str)


@FUZZ
@given(
    total=numbers,
    steps=st.lists(
        st.tuples(
            st.sampled_from(["increment", "child", "set_state", "track"]),
            numbers,
            numbers,
            st.none() | st.text(max_size=300) | st.integers(),
        ),
        max_size=8,
    ),
)
def test_progress_with_arbitrary_numbers(total, steps):
    counter["progress"] += 1
    try:
        root = Progress(total)
    except CLEAR_ERRORS:
        root = Progress()
    nodes = [root]
    for action, first, second, state in steps:
        node = nodes[-1]
        try:
            if action == "increment":
                node.increment(first, state=state)
            elif action == "child":
                nodes.append(node.create_child(represents=first, total=second))
            elif action == "set_state":
                node.set_state(state)
            else:
                items = range(first % 50) if isinstance(first, int) else [first, second]
                for _ in node.track(items, state=state):
                    pass
        except CLEAR_ERRORS as exc:
            assert str(exc)
        assert_readable(*nodes)
        assert not math.isnan(root.done)


@pytest.mark.parametrize("job_type", ["limited", "scripted"])
def test_an_unsaved_user_gets_a_clear_error(queueing, job_type):
    unsaved = get_user_model()(username="unsaved")
    with pytest.raises(InvalidJobValues, match="Save the user"):
        JobHandler.create_and_start(unsaved, job_type)
    assert not Job.objects.exists()


def test_a_deleted_user_gets_a_clear_error(queueing, user):
    stale = get_user_model().objects.get(pk=user.pk)
    user.delete()
    with pytest.raises(InvalidJobValues, match="does not exist"):
        JobHandler.create_and_start(stale, "limited")
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("job_type", "values"),
    [
        ("limited", {"label": None}),
        ("scripted", {"marker": "a\x00b"}),
        ("scripted", {"marker": "\udcff.csv"}),
        ("scripted", {"fail_at": []}),
    ],
)
def test_values_the_database_would_refuse_are_refused_naming_the_field_and_the_job(
    queueing, user, job_type, values
):
    """``full_clean()`` lets these through; the database's refusal named neither the field
    nor, in a batch, the job."""
    (field,) = values
    with pytest.raises(InvalidJobValues, match=f"^Invalid job values. {field}: ") as single:
        JobHandler.create_and_start(user, job_type, **values)
    assert list(single.value.errors) == [field]
    with pytest.raises(InvalidJobValues, match=f"^Job 1: Invalid job values. {field}: ") as many:
        JobHandler.create_and_start_many(user, job_type, [{}, values])
    assert list(many.value.errors) == [field]
    assert not Job.objects.exists()
    assert queueing.dispatched == []


@pytest.mark.parametrize(
    "spelling",
    [
        lambda pk: Decimal(pk) + Decimal("0.5"),
        lambda pk: Fraction(2 * pk + 1, 2),
        lambda pk: str(pk).encode(),
        lambda pk: bytearray(f" {pk}".encode()),
    ],
    ids=["decimal", "fraction", "bytes", "bytearray"],
)
def test_a_fractional_or_bytes_id_of_ones_own_job_is_no_job(queueing, user, spelling):
    """int() cuts 5.5 to 5 and reads b" 5" as 5: the caller's own job 5, which "5.5" and
    " 5" spelled as text do not reach."""
    job = JobHandler.create_and_start(user, "scripted")
    for call in (JobHandler.get_job, JobHandler.cancel):
        with pytest.raises(JobDoesNotExist):
            call(user, spelling(job.pk))
    assert Job.objects.get(pk=job.pk).state == JobState.PENDING


@isolate_apps("tests.testapp")
def test_values_of_a_model_with_a_generated_field_are_checked_without_reading_it(user):
    """The check above must not read a generated field, which raises on an unsaved job."""

    class ComputedJob(Job):
        size = models.IntegerField()
        double = models.GeneratedField(
            expression=F("size") * 2, output_field=models.IntegerField(), db_persist=True
        )

        class Meta:
            app_label = "testapp"

    class ComputedJobType(JobType):
        type = "computed"
        model_class = ComputedJob

    job, _prepared = creation.build(user, ComputedJobType(), {"size": 2})
    assert job.size == 2
    with pytest.raises(InvalidJobValues, match="^Invalid job values. size: "):
        creation.build(user, ComputedJobType(), {"size": []})


@isolate_apps("tests.testapp")
def test_values_left_to_the_database_are_not_checked_as_values(user):
    """A field's ``db_default`` (or any expression) is the database's to compute: the check
    above must not take it for a value (it refused every create of such a type)."""

    class DefaultedJob(Job):
        size = models.IntegerField(db_default=3)

        class Meta:
            app_label = "testapp"

    class DefaultedJobType(JobType):
        type = "defaulted"
        model_class = DefaultedJob

    job, _prepared = creation.build(user, DefaultedJobType(), {})
    assert isinstance(job.size, DatabaseDefault)
    with pytest.raises(InvalidJobValues, match="^Invalid job values. size: "):
        creation.build(user, DefaultedJobType(), {"size": []})


class CheckedAfterCreationJobType(LimitedJobType):
    """Refuses a label another of the user's jobs has, checked once its row is saved."""

    type = "checked_after_creation"
    max_count = None

    def after_job_creation(self, job, values):
        others = LimitedJob.objects.filter(user=job.user, label=job.label).exclude(pk=job.pk)
        if others.exists():
            raise ValidationError({"label": ["You have a job with this label already."]})


@pytest.fixture
def checked_after_creation():
    job_type_registry.register(CheckedAfterCreationJobType)
    yield CheckedAfterCreationJobType.type
    job_type_registry.unregister(CheckedAfterCreationJobType)


def test_a_validation_error_of_after_job_creation_refuses_the_values(
    queueing, user, checked_after_creation, django_capture_on_commit_callbacks
):
    """As one of prepare_values does: the caller got the ValidationError itself, a 500 from
    the API (no row was left either way)."""
    with django_capture_on_commit_callbacks(execute=True):
        first = JobHandler.create_and_start(user, checked_after_creation, label="a")
        message = "^Invalid job values. label: You have a job with this label already.$"
        with pytest.raises(InvalidJobValues, match=message) as refused:
            JobHandler.create_and_start(user, checked_after_creation, label="a")
        assert refused.value.errors == {"label": ["You have a job with this label already."]}
        with pytest.raises(InvalidJobValues, match="^Job 1: Invalid job values. label: "):
            JobHandler.create_and_start_many(
                user, checked_after_creation, [{"label": "b"}, {"label": "a"}]
            )
        response = client_for(user).post(
            "/api/jobs/", {"type": checked_after_creation, "label": "a"}, format="json"
        )
    assert response.status_code == 400
    assert response.json() == {"label": ["You have a job with this label already."]}
    assert list(Job.objects.values_list("pk", flat=True)) == [first.pk]
    assert queueing.dispatched == [first.pk]
