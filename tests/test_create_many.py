"""``JobHandler.create_and_start_many``: many jobs of one type in one transaction, all or none."""

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from task_ferry.exceptions import InvalidJobValues, JobTypeDoesNotExist, MaxJobCountExceeded
from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.registry import JobType, job_type_registry
from tests.testapp.models import HookCall, ReservationJob, ScriptedJob


class AnnouncedJobType(JobType):
    """Records its after_job_creation calls, with the values prepare_values returned."""

    type = "announced"
    model_class = ScriptedJob

    def prepare_values(self, values, user):
        return {**values, "marker": f"prepared {values.get('steps', 0)}"}

    def after_job_creation(self, job, values):
        HookCall.objects.create(job_id=job.pk, hook="after_job_creation", detail=values["marker"])


@pytest.fixture
def announced():
    job_type = job_type_registry.register(AnnouncedJobType)
    yield job_type
    job_type_registry.unregister(job_type)


class ReservationJobType(JobType[ReservationJob]):
    type = "reservation"
    model_class = ReservationJob


@pytest.fixture
def reservation():
    job_type = job_type_registry.register(ReservationJobType)
    yield job_type
    job_type_registry.unregister(job_type)


def test_takes_the_job_type_class(db, user, no_dispatch, announced):
    jobs = JobHandler.create_and_start_many(user, AnnouncedJobType, [{"steps": 1}, {"steps": 2}])

    assert [(type(job), job.type, job.steps) for job in jobs] == [
        (ScriptedJob, "announced", 1),
        (ScriptedJob, "announced", 2),
    ]
    assert no_dispatch == [job.pk for job in jobs]


def test_a_class_not_registered_creates_nothing(db, user, no_dispatch):
    with pytest.raises(JobTypeDoesNotExist, match="AnnouncedJobType is not a registered job type"):
        JobHandler.create_and_start_many(user, AnnouncedJobType, [{"steps": 1}])
    assert not Job.objects.exists()
    assert no_dispatch == []


def test_creates_every_job_in_order_and_dispatches_each_once(db, user, no_dispatch):
    jobs = JobHandler.create_and_start_many(
        user, "scripted", [{"steps": 1}, {"steps": 2, "marker": "b"}, {"steps": 3}]
    )

    assert [type(job) for job in jobs] == [ScriptedJob] * 3
    assert [job.steps for job in jobs] == [1, 2, 3]
    assert all(job.pk is not None and job.state == "pending" for job in jobs)
    stored = {job.pk: job for job in ScriptedJob.objects.all()}
    assert [(stored[job.pk].steps, stored[job.pk].marker) for job in jobs] == [
        (1, ""),
        (2, "b"),
        (3, ""),
    ]
    assert all(stored[job.pk].user == user and stored[job.pk].created_at for job in jobs)
    assert no_dispatch == [job.pk for job in jobs]
    # The handles are saved instances: refreshing them finds their rows.
    jobs[1].refresh_from_db()
    assert jobs[1].marker == "b"


def test_the_statements_do_not_grow_with_the_number_of_jobs(db, user, no_dispatch):
    def queries_for(count):
        with CaptureQueriesContext(connection) as queries:
            JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}] * count)
        return len(queries)

    few, many = queries_for(2), queries_for(40)
    if connection.vendor == "postgresql":
        assert few == many
    else:
        # Elsewhere each job is saved on its own: two rows per job.
        assert many - few == 2 * 38
    assert ScriptedJob.objects.count() == 42


def test_bad_values_for_one_job_create_none_and_name_its_position(db, user, no_dispatch):
    with pytest.raises(InvalidJobValues, match=r"^Job 1: .*steps: Ensure this value") as raised:
        JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}, {"steps": -1}])
    assert "steps" in raised.value.errors
    with pytest.raises(InvalidJobValues, match=r"^Job 0: .*no field.*colour"):
        JobHandler.create_and_start_many(user, "scripted", [{"colour": "red"}])
    with pytest.raises(InvalidJobValues, match=r"^Job 1: values must be a mapping.*got list"):
        JobHandler.create_and_start_many(user, "scripted", [{}, [("steps", 1)]])
    with pytest.raises(InvalidJobValues, match="list of mappings, one per job; got one dict"):
        JobHandler.create_and_start_many(user, "scripted", {"steps": 1})
    for nothing_to_iterate in (None, 5):
        with pytest.raises(InvalidJobValues) as info:
            JobHandler.create_and_start_many(user, "scripted", nothing_to_iterate)
        assert str(info.value) == (
            f"values_list must be a list of mappings, one per job; got "
            f"{type(nothing_to_iterate).__name__} {nothing_to_iterate!r}."
        )
    with pytest.raises(JobTypeDoesNotExist):
        JobHandler.create_and_start_many(user, "nope", [{}])
    assert not Job.objects.exists()
    assert no_dispatch == []


def test_jobs_of_a_batch_with_the_same_unique_values_are_named_without_a_query(
    db, user, no_dispatch, reservation, django_assert_num_queries
):
    # The database's refusal names no job.
    ContentType.objects.get_for_model(ReservationJob)  # cached from then on, as in a project
    values = [{"code": "a"}, {"code": "b"}, {"code": "a"}, {"code": "a"}]
    with django_assert_num_queries(0), pytest.raises(InvalidJobValues) as raised:
        JobHandler.create_and_start_many(user, "reservation", values)
    message = "Jobs 0, 2 and 3 have the same code, which must be unique."
    assert (str(raised.value), raised.value.errors) == (message, {"code": [message]})

    # full_clean() checks a UniqueConstraint against the stored rows (a query per job), not
    # the jobs of the batch against each other.
    values = [{"code": "a", "room": "r", "day": 1}, {"code": "b", "room": "r", "day": 1}]
    with pytest.raises(InvalidJobValues) as raised:
        JobHandler.create_and_start_many(user, "reservation", values)
    message = "Jobs 0 and 1 have the same room and day, which must be unique together."
    assert raised.value.errors == {"non_field_errors": [message]}
    assert not Job.objects.exists() and no_dispatch == []

    # NULLs are not equal to each other in a unique constraint.
    values = [{"code": "a", "room": "r"}, {"code": "b", "room": "r"}]
    assert len(JobHandler.create_and_start_many(user, "reservation", values)) == 2


def test_a_text_field_not_given_is_said_to_be_required(db, user, no_dispatch, reservation):
    # It read "code: This field cannot be blank.", as if the caller had sent "".
    with pytest.raises(InvalidJobValues) as raised:
        JobHandler.create_and_start_many(user, "reservation", [{"code": "a"}, {"room": "r"}])
    assert str(raised.value) == "Job 1: Invalid job values. code: This field is required."
    assert raised.value.errors == {"code": ["This field is required."]}
    with pytest.raises(InvalidJobValues) as raised:
        JobHandler.create_and_start(user, "reservation", code="")
    assert raised.value.errors == {"code": ["This field cannot be blank."]}
    assert not Job.objects.exists()


def test_a_batch_clashing_with_a_stored_job_is_refused_by_the_database(
    db, user, no_dispatch, reservation
):
    # A unique=True field is left to the database: finding the stored job would cost a query.
    JobHandler.create_and_start(user, "reservation", code="a")
    with pytest.raises(InvalidJobValues, match="^The database refused this job's values"):
        JobHandler.create_and_start_many(user, "reservation", [{"code": "b"}, {"code": "a"}])
    assert list(ReservationJob.objects.values_list("code", flat=True)) == ["a"]
    # A UniqueConstraint is checked against the stored rows by full_clean(), job by job.
    ReservationJob.objects.update(room="r", day=1)
    values = [{"code": "b"}, {"code": "c", "room": "r", "day": 1}]
    with pytest.raises(InvalidJobValues, match="^Job 1: .*Room and Day already exists"):
        JobHandler.create_and_start_many(user, "reservation", values)


def test_a_batch_past_max_count_creates_nothing(db, user, no_dispatch):
    JobHandler.create_and_start(user, "limited")  # max_count = 2
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start_many(user, "limited", [{}, {}])
    assert Job.objects.filter(type="limited").count() == 1
    [second] = JobHandler.create_and_start_many(user, "limited", [{}])
    assert Job.objects.filter(type="limited").count() == 2
    assert len(no_dispatch) == 2 and no_dispatch[-1] == second.pk


def test_after_job_creation_runs_for_each_job_with_its_prepared_values(
    db, user, no_dispatch, announced
):
    jobs = JobHandler.create_and_start_many(user, "announced", [{"steps": 4}, {"steps": 5}])
    calls = HookCall.objects.filter(hook="after_job_creation").order_by("pk")
    assert [(c.job_id, c.detail) for c in calls] == [
        (jobs[0].pk, "prepared 4"),
        (jobs[1].pk, "prepared 5"),
    ]
    assert [job.marker for job in ScriptedJob.objects.order_by("pk")] == [
        "prepared 4",
        "prepared 5",
    ]


def test_no_values_create_nothing(db, user, no_dispatch):
    with CaptureQueriesContext(connection) as queries:
        assert JobHandler.create_and_start_many(user, "scripted", []) == []
    assert len(queries) == 0


def test_a_rolled_back_batch_leaves_nothing(db, user, no_dispatch):
    with pytest.raises(RuntimeError), transaction.atomic():
        JobHandler.create_and_start_many(user, "scripted", [{}, {}])
        raise RuntimeError("caller changed its mind")
    assert not Job.objects.exists()


def test_inline_runs_every_job_then_raises_the_first_error(db, user):
    # The immediate executor runs each job once all are saved; a failing one stops no other.
    with pytest.raises(RuntimeError, match="scripted failure at step 0"):
        JobHandler.create_and_start_many(
            user, "scripted", [{"steps": 1}, {"steps": 1, "fail_at": 0}, {"steps": 1}]
        )
    states = list(ScriptedJob.objects.order_by("pk").values_list("state", "result"))
    assert states == [("finished", "done"), ("failed", ""), ("finished", "done")]


def test_save_signal_receivers_of_the_model_see_every_job_saved(db, user, no_dispatch):
    from django.db.models.signals import post_save

    saved = []

    def receiver(sender, instance, created, **kwargs):
        saved.append((instance.pk, created))

    post_save.connect(receiver, sender=ScriptedJob)
    try:
        jobs = JobHandler.create_and_start_many(user, "scripted", [{}, {}])
    finally:
        post_save.disconnect(receiver, sender=ScriptedJob)
    # Saved one by one through save(), not the bulk statements, so receivers run as usual.
    assert saved == [(jobs[0].pk, True), (jobs[1].pk, True)]
