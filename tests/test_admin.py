"""The read-only job admin: list, filters, search, detail page, cancel action, query budget."""

import datetime

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models.signals import post_init
from django.urls import reverse
from django.utils import timezone

from task_ferry.admin import EstimatedCountPaginator
from task_ferry.handler import JobHandler, transition
from task_ferry.models import Job, JobState
from task_ferry.snapshot import job_snapshot
from task_ferry.stores.base import get_store
from tests.jobs import make_job
from tests.testapp.models import HookCall, ScriptedJob

LIST_URL = reverse("admin:task_ferry_job_changelist")


def change_url(job):
    return reverse("admin:task_ferry_job_change", args=[job.pk])


def listed_ids(response):
    return [job.pk for job in response.context["cl"].result_list]


@pytest.fixture
def staff_viewer(db):
    """Staff who may view jobs but not cancel them."""
    viewer = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_job"))
    return viewer


def test_list_shows_columns_with_progress_bar(admin_client, user):
    job = make_job(user, progress_percentage=37)
    make_job(None, state=JobState.FINISHED, progress_percentage=100)
    response = admin_client.get(LIST_URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert '<progress class="task-ferry-progress" max="100" value="37"' in html
    assert "alice" in html
    assert "(system)" in html
    assert listed_ids(response)[-1] == job.pk


def test_list_shows_live_progress_from_the_store(admin_client, user):
    job = make_job(user)
    transition(job, JobState.STARTED, from_states=[JobState.PENDING])
    snapshot = {**job_snapshot(job), "state": "started", "progress_percentage": 64}
    get_store().write(job.pk, {**snapshot, "progress_state": "copying"})
    html = admin_client.get(LIST_URL).content.decode()
    assert 'value="64"' in html
    assert 'title="copying"' in html


def test_admin_cannot_add_change_or_delete(admin_client, user):
    job = make_job(user, steps=3)
    assert admin_client.get(reverse("admin:task_ferry_job_add")).status_code == 403
    response = admin_client.post(change_url(job), {"steps": 99})
    assert response.status_code == 403
    delete_url = reverse("admin:task_ferry_job_delete", args=[job.pk])
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    job.refresh_from_db()
    assert job.steps == 3
    actions = admin_client.get(LIST_URL).context["action_form"].fields["action"].choices
    assert [name for name, _ in actions if name] == ["cancel_jobs"]


def test_detail_page_shows_type_fields_and_traceback(db, admin_client, user):
    with pytest.raises(RuntimeError):
        JobHandler.create_and_start(user, "scripted", steps=4, fail_at=2, marker="m-17")
    job = Job.objects.get()
    response = admin_client.get(change_url(job))
    assert response.status_code == 200
    html = response.content.decode()
    assert "m-17" in html
    assert "scripted failure at step 2" in html
    assert "Traceback (most recent call last)" in html
    assert "in run" in html


def test_filters_by_state_type_and_age(admin_client, user):
    old = make_job(user, state=JobState.FINISHED)
    Job.objects.filter(pk=old.pk).update(created_at=timezone.now() - datetime.timedelta(days=10))
    recent_pending = make_job(user)
    limited = JobHandler.create_and_start(user, "limited")

    assert listed_ids(admin_client.get(LIST_URL, {"state": "pending"})) == [recent_pending.pk]
    assert listed_ids(admin_client.get(LIST_URL, {"type": "limited"})) == [limited.pk]
    assert listed_ids(admin_client.get(LIST_URL, {"age": "gt7d"})) == [old.pk]
    assert set(listed_ids(admin_client.get(LIST_URL, {"age": "24h"}))) == {
        recent_pending.pk,
        limited.pk,
    }


def test_search_by_id_type_username_and_email(admin_client, user, other_user):
    other_user.email = "bob@example.com"
    other_user.save()
    mine = make_job(user)
    theirs = make_job(other_user)
    limited = JobHandler.create_and_start(user, "limited")

    assert listed_ids(admin_client.get(LIST_URL, {"q": str(theirs.pk)})) == [theirs.pk]
    assert listed_ids(admin_client.get(LIST_URL, {"q": "limited"})) == [limited.pk]
    assert set(listed_ids(admin_client.get(LIST_URL, {"q": "ali"}))) == {mine.pk, limited.pk}
    assert listed_ids(admin_client.get(LIST_URL, {"q": "bob@example"})) == [theirs.pk]
    assert listed_ids(admin_client.get(LIST_URL, {"q": "nobody-matches"})) == []
    # Digits int() refuses, and ids beyond a bigint, find nothing instead of failing.
    for term in ("²", "12³", "9" * 30):
        assert listed_ids(admin_client.get(LIST_URL, {"q": term})) == []


def test_search_follows_the_user_models_username_and_email_fields(
    admin_client, user, other_user, monkeypatch
):
    User = type(user)
    # A user model that logs in by its first name and has no email column.
    monkeypatch.setattr(User, "USERNAME_FIELD", "first_name")
    monkeypatch.setattr(User, "EMAIL_FIELD", "no_such_field")
    other_user.first_name = "Roberta"
    other_user.save()
    theirs = make_job(other_user)
    make_job(user)

    assert listed_ids(admin_client.get(LIST_URL, {"q": "obert"})) == [theirs.pk]
    assert listed_ids(admin_client.get(LIST_URL, {"q": other_user.username})) == []


def test_cancel_action_goes_through_the_handler(
    admin_client, user, django_capture_on_commit_callbacks
):
    pending = make_job(user)
    running = make_job(user)
    transition(running, JobState.STARTED, from_states=[JobState.PENDING])
    finished = make_job(user, state=JobState.FINISHED)

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            LIST_URL,
            {"action": "cancel_jobs", "_selected_action": [pending.pk, running.pk, finished.pk]},
            follow=True,
        )
    assert response.status_code == 200
    (message,) = [str(m) for m in response.context["messages"]]
    assert "Cancelled 1 pending job(s)" in message
    assert "asked 1 running job(s) to stop" in message
    assert "left 1 ended job(s) unchanged" in message

    pending.refresh_from_db()
    assert pending.state == JobState.CANCELLED
    # on_cancelled ran once, with the specific job: the handler's path, not a row update.
    assert list(HookCall.objects.values_list("job_id", "hook")) == [(pending.pk, "on_cancelled")]
    running.refresh_from_db()
    assert running.state == JobState.STARTED
    assert get_store().is_cancel_requested(running.pk)
    finished.refresh_from_db()
    assert finished.state == JobState.FINISHED


def test_cancel_action_on_jobs_that_ended_or_were_deleted_meanwhile(admin_client, user):
    ended, deleted = make_job(user), make_job(user)
    done = set()

    def meanwhile(sender, instance, **kwargs):
        # As the action reads each job's own row, another process ends or deletes it.
        if instance.pk in done or instance.pk not in (ended.pk, deleted.pk):
            return
        done.add(instance.pk)
        if instance.pk == ended.pk:
            transition(Job.objects.get(pk=ended.pk), JobState.FINISHED, from_states=["pending"])
        else:
            Job.objects.filter(pk=deleted.pk).delete()

    post_init.connect(meanwhile, sender=ScriptedJob)
    try:
        response = admin_client.post(
            LIST_URL,
            {"action": "cancel_jobs", "_selected_action": [ended.pk, deleted.pk]},
            follow=True,
        )
    finally:
        post_init.disconnect(meanwhile, sender=ScriptedJob)
    # A server error for the deleted one before; the ended one was counted as asked to stop.
    assert response.status_code == 200
    assert [str(m) for m in response.context["messages"]] == [
        f"Job {deleted.pk} was deleted meanwhile.",
        "Left 1 ended job(s) unchanged.",
    ]
    assert Job.objects.get(pk=ended.pk).state == JobState.FINISHED


def test_view_only_staff_cannot_cancel(client, staff_viewer, user):
    job = make_job(user)
    client.force_login(staff_viewer)
    response = client.get(LIST_URL)
    assert response.status_code == 200
    assert response.context["action_form"] is None or "cancel_jobs" not in str(
        response.context["action_form"].fields["action"].choices
    )
    client.post(LIST_URL, {"action": "cancel_jobs", "_selected_action": [job.pk]})
    job.refresh_from_db()
    assert job.state == JobState.PENDING


@pytest.fixture
def many_jobs(db, user, other_user):
    """320 jobs of two owners and every state, a few of them live."""
    jobs = []
    states = [JobState.FINISHED, JobState.FAILED, JobState.CANCELLED, JobState.PENDING]
    for i in range(320):
        owner = (user, other_user, None)[i % 3]
        jobs.append(make_job(owner, state=states[i % 4], progress_percentage=i % 101))
    started = make_job(user)
    transition(started, JobState.STARTED, from_states=[JobState.PENDING])
    return jobs


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"state": "failed"},
        {"type": "scripted", "age": "24h"},
        {"q": "alice"},
        {"p": "2"},
        {"o": "-2"},
    ],
)
def test_list_page_stays_within_five_queries(
    admin_client, many_jobs, params, django_assert_max_num_queries
):
    admin_client.get(LIST_URL)  # warm the content type cache, as a running site has
    with django_assert_max_num_queries(5):
        response = admin_client.get(LIST_URL, params)
    assert response.status_code == 200
    assert response.context["cl"].result_list


def test_large_lists_show_an_estimated_count(
    admin_client, many_jobs, monkeypatch, django_assert_max_num_queries
):
    monkeypatch.setattr(EstimatedCountPaginator, "exact_count_limit", 50)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {Job._meta.db_table}")
    with django_assert_max_num_queries(5):
        response = admin_client.get(LIST_URL)
    cl = response.context["cl"]
    assert len(cl.result_list) == 100
    if connection.vendor == "postgresql":
        assert cl.paginator.is_estimate
        assert "about" in response.content.decode()
        assert cl.result_count > 50
    else:
        assert cl.result_count == 321


def test_small_lists_are_counted_exactly(admin_client, many_jobs):
    response = admin_client.get(LIST_URL, {"state": "failed"})
    cl = response.context["cl"]
    assert cl.result_count == 80
    assert not cl.paginator.is_estimate
    assert "80 jobs" in response.content.decode()


def test_cancel_action_on_a_job_whose_type_was_removed(admin_client, user):
    orphan = make_job(user)
    Job.objects.filter(pk=orphan.pk).update(type="removed_type")
    response = admin_client.post(
        LIST_URL, {"action": "cancel_jobs", "_selected_action": [orphan.pk]}, follow=True
    )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    # Cancelled like any other; the log says its on_cancelled could not run.
    assert messages == ["Cancelled 1 pending job(s)."]
    orphan.refresh_from_db()
    assert orphan.state == JobState.CANCELLED


@pytest.mark.parametrize("params", [{"type": "scripted\x00"}, {"state": "pending\x00"}])
def test_filter_values_no_row_can_hold_are_refused(admin_client, user, params):
    # PostgreSQL refuses a NUL in a query: the page failed with a server error.
    make_job(user)
    response = admin_client.get(LIST_URL, params)
    assert response.status_code == 302
    assert response["Location"] == f"{LIST_URL}?e=1"
