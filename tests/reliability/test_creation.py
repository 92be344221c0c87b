"""Creating jobs under contention and inside transactions: max_count holds for threads and for
separate processes, and a rolled-back create leaves nothing behind."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connections, transaction

from task_ferry.exceptions import MaxJobCountExceeded
from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.stores.base import get_store
from tests.reliability.helpers import needs_row_locks

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # Python 3.12+ warns about fork() in a process with threads (here: the test process's job
    # monitor). The children only open their own database connections and create jobs, and
    # fork is what lets them share the test database's settings and the stubbed executor.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

CALLS = 20


def create(user_id: int, job_type: str) -> str:
    """One create_and_start; returns the outcome's name."""
    try:
        user = get_user_model().objects.get(pk=user_id)
        JobHandler.create_and_start(user, job_type)
    except MaxJobCountExceeded:
        return "MaxJobCountExceeded"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connections.close_all()
    return "created"


def in_threads(calls: list[tuple[int, str]]) -> Counter[tuple[int, str, str]]:
    barrier = threading.Barrier(len(calls))
    outcomes: Counter[tuple[int, str, str]] = Counter()
    lock = threading.Lock()

    def call(user_id: int, job_type: str) -> None:
        barrier.wait()
        outcome = create(user_id, job_type)
        with lock:
            outcomes[(user_id, job_type, outcome)] += 1

    threads = [threading.Thread(target=call, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def _process_main(barrier: Any, results: Any, user_id: int, job_type: str) -> None:
    barrier.wait()
    results.put((user_id, job_type, create(user_id, job_type)))


def in_processes(calls: list[tuple[int, str]]) -> Counter[tuple[int, str, str]]:
    # Children open their own connections; none may inherit the parent's socket.
    connections.close_all()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(calls))
    results = context.Queue()
    procs = [context.Process(target=_process_main, args=(barrier, results, *c)) for c in calls]
    for p in procs:
        p.start()
    outcomes: Counter[tuple[int, str, str]] = Counter(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    return outcomes


@needs_row_locks
@pytest.mark.parametrize("runner", [in_threads, in_processes], ids=["threads", "processes"])
def test_concurrent_creates_respect_max_count(queueing, user, runner):
    outcomes = runner([(user.pk, "limited")] * CALLS)

    assert outcomes == {
        (user.pk, "limited", "created"): 2,
        (user.pk, "limited", "MaxJobCountExceeded"): CALLS - 2,
    }
    assert Job.objects.filter(user=user, type="limited").count() == 2
    if runner is in_threads:
        assert sorted(queueing.dispatched) == sorted(Job.objects.values_list("pk", flat=True))


@needs_row_locks
@pytest.mark.parametrize("runner", [in_threads, in_processes], ids=["threads", "processes"])
def test_users_and_types_are_independent(queueing, user, other_user, runner):
    calls = (
        [(user.pk, "limited")] * 8 + [(other_user.pk, "limited")] * 8 + [(user.pk, "scripted")] * 4
    )
    outcomes = runner(calls)

    assert outcomes == {
        (user.pk, "limited", "created"): 2,
        (user.pk, "limited", "MaxJobCountExceeded"): 6,
        (other_user.pk, "limited", "created"): 2,
        (other_user.pk, "limited", "MaxJobCountExceeded"): 6,
        (user.pk, "scripted", "created"): 4,
    }


def test_rolled_back_create_leaves_no_row_and_dispatches_nothing(queueing, user):
    before = set(Job.objects.values_list("pk", flat=True))

    with pytest.raises(RuntimeError, match="caller changed its mind"), transaction.atomic():
        rolled_back = JobHandler.create_and_start(user, "scripted")
        assert queueing.dispatched == []
        raise RuntimeError("caller changed its mind")

    assert set(Job.objects.values_list("pk", flat=True)) == before
    assert queueing.dispatched == []
    assert get_store().read(rolled_back.pk) is None
    # The slot the rolled-back job briefly held is free.
    for _ in range(2):
        JobHandler.create_and_start(user, "limited")


def test_committed_create_dispatches_once_after_commit(queueing, user):
    with transaction.atomic():
        job = JobHandler.create_and_start(user, "scripted")
        assert queueing.dispatched == []

    assert queueing.dispatched == [job.pk]


def test_rolled_back_savepoint_dispatches_nothing_but_the_outer_create_runs(queueing, user):
    with transaction.atomic():
        kept = JobHandler.create_and_start(user, "scripted")
        with pytest.raises(RuntimeError), transaction.atomic():
            JobHandler.create_and_start(user, "scripted")
            raise RuntimeError

    assert queueing.dispatched == [kept.pk]
    assert list(Job.objects.values_list("pk", flat=True)) == [kept.pk]
