"""``JobHandler``'s async counterparts (``acreate_and_start``, ``aget_job``...), awaited in a
running event loop as an async view awaits them. Their ORM work runs on Django's thread for sync
code, with a connection of its own: hence ``transactional_db``."""

import datetime
import json
import threading

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connection
from django.http import JsonResponse
from django.test import AsyncRequestFactory
from django.utils import timezone

from task_ferry.exceptions import JobDoesNotExist
from task_ferry.executors.immediate import ImmediateExecutor
from task_ferry.handler import JobHandler
from task_ferry.models import Job
from tests.myapp.job_types import ExportJobType
from tests.testapp.job_types import LimitedJobType
from tests.testapp.models import HookCall, LimitedJob, ScriptedJob

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def sync_thread(transactional_db):
    """The ident of the thread ``sync_to_async`` runs Django's sync code on; its connection is
    closed after the test, so that none is left open on the test database."""
    yield await sync_to_async(threading.get_ident)()
    # Looked up there: ``connection`` is each thread's own.
    await sync_to_async(lambda: connection.close())()


@pytest.fixture
def dispatched_from(monkeypatch):
    """Jobs stay pending; the id of each job handed to the executor, with the ident of the
    thread that handed it."""
    dispatched = []
    monkeypatch.setattr(
        ImmediateExecutor,
        "enqueue",
        lambda self, job_id: dispatched.append((job_id, threading.get_ident())),
    )
    return dispatched


async def test_acreate_and_start_returns_the_job_its_executor_ran(sync_thread, user):
    job = await JobHandler.acreate_and_start(user, "scripted", steps=3)
    assert isinstance(job, ScriptedJob)
    assert (job.state, job.result) == ("finished", "done")
    stored = await ScriptedJob.objects.aget(pk=job.pk)
    assert (stored.state, stored.result, stored.user_id) == ("finished", "done", user.pk)


async def test_a_job_is_created_and_dispatched_on_djangos_thread_for_sync_code(
    sync_thread, user, dispatched_from
):
    # Where sync ORM code of the same request runs, so the job's transaction and its on_commit
    # dispatch are that thread's; not a thread of a pool of its own.
    job = await JobHandler.acreate_and_start(user, LimitedJobType, label="x")
    assert type(job) is LimitedJob
    assert job.state == "pending"
    jobs = await JobHandler.acreate_and_start_many(user, "scripted", [{"steps": 1}])
    assert dispatched_from == [(job.pk, sync_thread), (jobs[0].pk, sync_thread)]
    assert threading.get_ident() != sync_thread


async def test_acreate_and_start_many_creates_and_runs_every_job(sync_thread, user):
    jobs = await JobHandler.acreate_and_start_many(user, "scripted", [{"steps": 1}, {"steps": 2}])
    assert [(job.steps, job.state) for job in jobs] == [(1, "finished"), (2, "finished")]
    assert await Job.objects.filter(pk__in=[job.pk for job in jobs]).acount() == 2


async def test_aget_job_gives_its_owner_the_job_and_refuses_anyone_else(
    sync_thread, user, other_user
):
    job = await JobHandler.acreate_and_start(user, "scripted", steps=1)
    found = await JobHandler.aget_job(user, str(job.pk))
    assert (type(found), found.pk, found.state) == (ScriptedJob, job.pk, "finished")
    for who, job_id in [(other_user, job.pk), (None, job.pk), (user, "abc")]:
        with pytest.raises(JobDoesNotExist):
            await JobHandler.aget_job(who, job_id)


async def test_acancel_cancels_a_pending_job_of_its_owner_only(
    sync_thread, user, other_user, no_dispatch
):
    job = await JobHandler.acreate_and_start(user, "scripted")
    with pytest.raises(JobDoesNotExist):
        await JobHandler.acancel(other_user, job.pk)
    assert (await Job.objects.aget(pk=job.pk)).state == "pending"

    cancelled = await JobHandler.acancel(user, job.pk)
    # The instance acreate_and_start gave is kept in step, as the sync method's is.
    assert cancelled.state == job.state == "cancelled"
    assert (await Job.objects.aget(pk=job.pk)).state == "cancelled"
    hooks = HookCall.objects.filter(job_id=job.pk).values_list("hook", flat=True)
    assert [hook async for hook in hooks] == ["on_cancelled"]


async def test_acancel_job_cancels_the_job_given(sync_thread, user, no_dispatch):
    job = await JobHandler.acreate_and_start(user, "scripted")
    assert (await JobHandler.acancel_job(job)).state == "cancelled"
    assert (await Job.objects.aget(pk=job.pk)).state == "cancelled"


async def test_acleanup_old_jobs_deletes_the_expired_jobs(sync_thread, user):
    old = await JobHandler.acreate_and_start(user, "scripted", steps=1)
    recent = await JobHandler.acreate_and_start(user, "scripted", steps=1)
    await Job.objects.filter(pk=old.pk).aupdate(
        finished_at=timezone.now() - datetime.timedelta(days=2)
    )
    assert await JobHandler.acleanup_old_jobs(older_than=datetime.timedelta(days=1)) == 1
    assert [pk async for pk in Job.objects.values_list("pk", flat=True)] == [recent.pk]


async def test_in_an_event_loop_the_sync_methods_raise_and_the_async_ones_work(
    sync_thread, user, no_dispatch
):
    with pytest.raises(SynchronousOnlyOperation):
        JobHandler.create_and_start(user, "scripted")
    job = await JobHandler.acreate_and_start(user, "scripted")
    with pytest.raises(SynchronousOnlyOperation):
        JobHandler.get_job(user, job.pk)
    assert (await JobHandler.aget_job(user, job.pk)).pk == job.pk
    with pytest.raises(SynchronousOnlyOperation):
        JobHandler.cancel(user, job.pk)
    assert (await JobHandler.acancel(user, job.pk)).state == "cancelled"
    assert [pk async for pk in Job.objects.values_list("pk", flat=True)] == [job.pk]


# A copy of docs/job-types.md's async views: a change to them belongs here too.
async def start_export(request, table_id):
    user = await request.auser()
    job = await JobHandler.acreate_and_start(user, ExportJobType, table_id=table_id)
    return JsonResponse({"id": job.pk, "state": job.state}, status=202)


async def cancel_export(request, job_id):
    try:
        job = await JobHandler.acancel(await request.auser(), job_id)
    except JobDoesNotExist:
        return JsonResponse({"detail": "Not found."}, status=404)
    return JsonResponse({"id": job.pk, "state": job.state})


def request_of(user):
    """A POST as an async view gets it behind ``AuthenticationMiddleware``."""
    request = AsyncRequestFactory().post("/")

    async def auser():
        return user

    request.auser = auser
    return request


async def test_the_async_views_of_the_docs(sync_thread, user, other_user):
    started = await start_export(request_of(user), 3)
    assert started.status_code == 202
    job_id = json.loads(started.content)["id"]
    assert json.loads(started.content) == {"id": job_id, "state": "finished"}
    refused = await cancel_export(request_of(other_user), job_id)
    assert refused.status_code == 404
    cancelled = await cancel_export(request_of(user), job_id)
    # Ended before the cancel: the ImmediateExecutor ran it.
    assert json.loads(cancelled.content) == {"id": job_id, "state": "finished"}
