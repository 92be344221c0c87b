"""Races between a run's finish or failure and a cancel or the sweep, fought by real threads on
real connections. Whoever wins, each job ends once and its ending hook and signal fire once."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from django.db import connections

from task_ferry import signals
from task_ferry.handler import JobHandler
from task_ferry.models import Job
from tests.reliability.helpers import hook_calls, needs_row_locks
from tests.reliability.timing import FAST_HEARTBEAT
from tests.testapp.models import Marker, ScriptedJob

pytestmark = pytest.mark.django_db(transaction=True)

ROUNDS = 15


@pytest.fixture
def ending_signals() -> Iterator[Counter[tuple[int, str]]]:
    """Counts ending signals per (job id, signal name), from every thread."""
    seen: Counter[tuple[int, str]] = Counter()
    lock = threading.Lock()
    receivers = {}
    for name in ("job_finished", "job_failed", "job_cancelled"):

        def receiver(sender: Any, job: Job, _name: str = name, **kwargs: Any) -> None:
            with lock:
                seen[(job.pk, _name)] += 1

        receivers[name] = receiver
        getattr(signals, name).connect(receiver, weak=False)
    yield seen
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def race(*contenders: Callable[[], Any]) -> None:
    """Start all contenders at once, each in its own thread with its own connection."""
    barrier = threading.Barrier(len(contenders))

    def run(contender: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            contender()
        except Exception:
            pass  # A failing job re-raises; the outcome is checked in the database.
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def check_one_ending(job: Job, seen: Counter[tuple[int, str]]) -> str:
    job = ScriptedJob.objects.get(pk=job.pk)
    marker = Marker.objects.filter(name=job.marker).exists()
    endings = {
        "finished": seen[(job.pk, "job_finished")],
        "failed": seen[(job.pk, "job_failed")],
        "cancelled": seen[(job.pk, "job_cancelled")],
    }
    assert job.state in endings, job.state
    assert endings == {name: int(name == job.state) for name in endings}, (job.state, endings)
    assert hook_calls(job, "on_error") == int(job.state == "failed")
    assert hook_calls(job, "on_cancelled") == int(job.state == "cancelled")
    # The job's work is committed exactly when it finished.
    assert marker == (job.state == "finished")
    assert (job.result == "done") == (job.state == "finished")
    return str(job.state)


def later(delay: float, action: Callable[[], Any]) -> Callable[[], Any]:
    def delayed() -> Any:
        time.sleep(delay)
        return action()

    return delayed


@needs_row_locks
def test_finish_vs_cancel(queueing, ferry, user, ending_signals):
    ferry(**FAST_HEARTBEAT)
    outcomes = Counter()
    for i in range(ROUNDS):
        job = JobHandler.create_and_start(
            user, "scripted", steps=4, tick_delay=0.01, marker=f"fc{i}"
        )
        race(
            partial(JobHandler.run_job, job.pk),
            later(random.uniform(0, 0.06), partial(JobHandler.cancel, user, job.pk)),
        )
        outcomes[check_one_ending(job, ending_signals)] += 1
    assert set(outcomes) <= {"finished", "cancelled"}


@needs_row_locks
def test_fail_vs_cancel(queueing, ferry, user, ending_signals):
    ferry(**FAST_HEARTBEAT)
    outcomes = Counter()
    for i in range(ROUNDS):
        job = JobHandler.create_and_start(
            user, "scripted", steps=6, tick_delay=0.01, fail_at=3, marker=f"xc{i}"
        )
        race(
            partial(JobHandler.run_job, job.pk),
            later(random.uniform(0, 0.06), partial(JobHandler.cancel, user, job.pk)),
        )
        outcomes[check_one_ending(job, ending_signals)] += 1
    assert set(outcomes) <= {"failed", "cancelled"}


@needs_row_locks
def test_finish_vs_sweep(queueing, ferry, user, ending_signals):
    # The monitor does not beat again during the run, so the sweep sees the run as lost just
    # as it finishes.
    ferry(HEARTBEAT_INTERVAL=30, HEARTBEAT_TIMEOUT=0.15)
    outcomes = Counter()
    for i in range(ROUNDS):
        job = JobHandler.create_and_start(
            user, "scripted", steps=1, block_for=random.uniform(0.1, 0.2), marker=f"fs{i}"
        )

        def sweep_until_ended(job: Job = job) -> None:
            while Job.objects.filter(pk=job.pk, state__in=["pending", "started"]).exists():
                JobHandler.sweep_stale_jobs()

        race(partial(JobHandler.run_job, job.pk), sweep_until_ended, sweep_until_ended)
        outcomes[check_one_ending(job, ending_signals)] += 1
    assert set(outcomes) <= {"finished", "failed"}
    failed = ScriptedJob.objects.filter(state="failed")
    assert all("worker lost" in j.human_readable_error for j in failed)


@needs_row_locks
def test_start_vs_pending_timeout(queueing, ferry, user, ending_signals):
    ferry(**FAST_HEARTBEAT, PENDING_TIMEOUT=0)
    outcomes = Counter()
    for i in range(ROUNDS):
        job = JobHandler.create_and_start(user, "scripted", steps=1, marker=f"sp{i}")
        race(
            later(random.uniform(0, 0.01), partial(JobHandler.run_job, job.pk)),
            later(random.uniform(0, 0.01), JobHandler.sweep_stale_jobs),
        )
        outcomes[check_one_ending(job, ending_signals)] += 1
    assert set(outcomes) <= {"finished", "failed"}


@needs_row_locks
def test_cancel_of_pending_vs_start(queueing, ferry, user, ending_signals):
    ferry(**FAST_HEARTBEAT)
    outcomes = Counter()
    for i in range(ROUNDS):
        job = JobHandler.create_and_start(user, "scripted", steps=1, marker=f"cp{i}")
        race(partial(JobHandler.run_job, job.pk), partial(JobHandler.cancel, user, job.pk))
        outcomes[check_one_ending(job, ending_signals)] += 1
    assert set(outcomes) <= {"finished", "cancelled"}


@needs_row_locks
def test_run_saving_its_stale_row_after_the_sweep_cannot_revive_the_job(
    queueing, ferry, user, reliability_types, ending_signals
):
    # No heartbeat during the run, so only the fence stops the finish.
    ferry(HEARTBEAT_INTERVAL=30, HEARTBEAT_TIMEOUT=0.1)
    job = JobHandler.create_and_start(user, "whole_row_save", block_for=1, marker="stale-row")

    def sweep_while_it_sleeps() -> None:
        while not Job.objects.filter(pk=job.pk, state="started").exists():
            time.sleep(0.01)
        time.sleep(0.25)
        assert JobHandler.sweep_stale_jobs() == 1

    race(partial(JobHandler.run_job, job.pk), sweep_while_it_sleeps)

    job = ScriptedJob.objects.get(pk=job.pk)
    assert (job.state, job.result) == ("failed", "")
    assert "worker lost" in job.human_readable_error
    assert not Marker.objects.filter(name="stale-row").exists()
    assert check_one_ending(job, ending_signals) == "failed"


def test_saving_a_stale_instance_leaves_the_handlers_columns_alone(queueing, user):
    job = JobHandler.create_and_start(user, "scripted", steps=3)
    stale = ScriptedJob.objects.get(pk=job.pk)
    JobHandler.cancel(user, job.pk)

    stale.steps = 7
    stale.save()

    saved = ScriptedJob.objects.get(pk=job.pk)
    assert (saved.state, saved.steps) == ("cancelled", 7)
