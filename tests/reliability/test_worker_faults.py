"""Real worker processes under real faults: a blocking job, SIGKILL, SIGSTOP (a zombie that comes
back after the sweep) and a database backend killed mid-job."""

from __future__ import annotations

import signal
import time

import pytest

from task_ferry.exceptions import MaxJobCountExceeded
from task_ferry.handler import JobHandler
from task_ferry.models import ENDED_STATES, Heartbeat, Job
from tests.backends import end_sessions, other_sessions
from tests.reliability.helpers import hook_calls, state_of
from tests.reliability.timing import FAST_HEARTBEAT
from tests.testapp.models import Marker, ScriptedJob
from tests.waiting import wait_for

pytestmark = pytest.mark.worker


def beat_at(job: Job):
    return Heartbeat.objects.filter(job_id=job.pk).values_list("beat_at", flat=True).first()


def test_heartbeat_keeps_beating_while_the_job_blocks_without_ticks(
    queueing, ferry, processes, user
):
    ferry(**FAST_HEARTBEAT)
    worker = processes.worker()
    job = JobHandler.create_and_start(user, "scripted", block_for=3, steps=1)
    wait_for(lambda: beat_at(job))

    beats = set()
    swept = 0
    while state_of(job) == "started":
        beats.add(beat_at(job))
        swept += JobHandler.sweep_stale_jobs()
        time.sleep(0.1)

    assert state_of(job) == "finished", worker.output()
    assert swept == 0
    # 3 s of blocking at a 0.2 s interval: the heart kept beating throughout.
    assert len(beats) >= 8


def test_killed_worker_is_detected_and_its_slot_freed(queueing, ferry, processes, user, capsys):
    ferry(**FAST_HEARTBEAT, MAX_JOBS_PER_USER_PER_TYPE=1)
    sweep_interval = 0.25
    worker = processes.worker()
    sweepers = [processes.sweeper(sweep_interval), processes.sweeper(sweep_interval)]
    victim = JobHandler.create_and_start(
        user, "scripted", steps=400, tick_delay=0.05, marker="victim-work"
    )
    queued = [JobHandler.create_and_start(None, "scripted", steps=3) for _ in range(4)]
    wait_for(
        lambda: ScriptedJob.objects.get(pk=victim.pk).progress_percentage > 0 or beat_at(victim)
    )
    with pytest.raises(MaxJobCountExceeded):
        JobHandler.create_and_start(user, "scripted")

    worker.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: state_of(victim) == "failed", timeout=10, interval=0.01)
    detection = time.monotonic() - killed_at

    assert all(s.proc.poll() is None for s in sweepers)
    victim = JobHandler.get_job(user, victim.pk)
    assert "worker lost" in victim.human_readable_error
    # The sweeper runs on_error right after committing the failed state.
    wait_for(lambda: hook_calls(victim, "on_error") == 1, timeout=5)
    assert not Marker.objects.filter(name="victim-work").exists()
    bound = FAST_HEARTBEAT["HEARTBEAT_TIMEOUT"] + FAST_HEARTBEAT["HEARTBEAT_INTERVAL"]
    assert detection < bound + sweep_interval + 1  # slack for a loaded CI machine

    # The slot is free; a new worker takes the queued jobs and the retry.
    retry = JobHandler.create_and_start(user, "scripted", steps=3)
    processes.worker()
    everything = [victim, *queued, retry]
    wait_for(lambda: all(state_of(j) in ENDED_STATES for j in everything), timeout=20)
    lost = [j.pk for j in everything if state_of(j) not in ENDED_STATES]
    assert lost == []
    assert [state_of(j) for j in [*queued, retry]] == ["finished"] * 5
    assert hook_calls(victim, "on_error") == 1
    with capsys.disabled():
        print(
            f"\n[reliability] worker SIGKILL: detected after {detection:.2f}s "
            f"(heartbeat timeout {FAST_HEARTBEAT['HEARTBEAT_TIMEOUT']}s, interval "
            f"{FAST_HEARTBEAT['HEARTBEAT_INTERVAL']}s, sweep every {sweep_interval}s); "
            f"jobs lost: {len(lost)} of {len(everything)}"
        )


def test_zombie_worker_cannot_overwrite_the_sweep_result(queueing, ferry, processes, user):
    ferry(**FAST_HEARTBEAT)
    worker = processes.worker()
    # 20 s of work, so only the monitor noticing the sweep can end the zombie quickly.
    job = JobHandler.create_and_start(
        user, "scripted", steps=400, tick_delay=0.05, marker="zombie-work"
    )
    wait_for(lambda: beat_at(job))

    worker.signal(signal.SIGSTOP)
    wait_for(lambda: JobHandler.sweep_stale_jobs(), timeout=10, interval=0.1)
    assert state_of(job) == "failed"
    worker.signal(signal.SIGCONT)

    # The zombie wakes up, learns at its next heartbeat that it was ended, and stops at its
    # next tick; its work is rolled back.
    wait_for(lambda: f"ran {job.pk}" in worker.output(), timeout=5)
    job = JobHandler.get_job(user, job.pk)
    assert job.state == "failed"
    assert "worker lost" in job.human_readable_error
    assert job.result == ""
    assert not Marker.objects.filter(name="zombie-work").exists()
    assert hook_calls(job, "on_error") == 1
    assert hook_calls(job, "on_cancelled") == 0
    # The worker lives on and runs the next job.
    after = JobHandler.create_and_start(user, "scripted", steps=2)
    wait_for(lambda: state_of(after) == "finished")


def test_database_connection_drop_fails_the_job_and_the_worker_runs_the_next(
    queueing, ferry, processes, user
):
    ferry(**FAST_HEARTBEAT)
    worker = processes.worker()
    job = JobHandler.create_and_start(user, "scripted", block_for=3, steps=2, marker="dropped")
    wait_for(lambda: beat_at(job))

    def the_jobs_session():
        # The job's connection holds its transaction open while the job blocks; a beat's
        # upsert holds one for a moment on a connection of its own (in about 1 % of samples
        # on PostgreSQL under load): wait until the job's is the only one.
        sessions = other_sessions(in_transaction=True)
        return sessions if len(sessions) == 1 else None

    end_sessions(wait_for(the_jobs_session))

    wait_for(lambda: state_of(job) == "failed", timeout=10)
    job = JobHandler.get_job(user, job.pk)
    assert "database connection was lost" in job.human_readable_error
    # PostgreSQL: "terminating connection ..."; MySQL: "Lost connection ..." or "... gone away".
    assert any(
        words in job.error for words in ("terminating connection", "Lost connection", "gone away")
    ), job.error
    wait_for(lambda: hook_calls(job, "on_error") == 1, timeout=5)
    assert not Marker.objects.filter(name="dropped").exists()

    after = JobHandler.create_and_start(user, "scripted", steps=2, marker="after")
    wait_for(lambda: state_of(after) == "finished", timeout=10)
    assert Marker.objects.filter(name="after").exists()
    assert worker.proc.poll() is None


def test_zombie_that_saves_its_whole_row_cannot_revive_the_job(
    queueing, ferry, processes, user, reliability_types
):
    ferry(**FAST_HEARTBEAT)
    worker = processes.worker()
    # The job's code calls job.save() on its stale "started" instance after blocking.
    job = JobHandler.create_and_start(user, "whole_row_save", block_for=2.5, marker="whole-row")
    wait_for(lambda: beat_at(job))
    worker.signal(signal.SIGSTOP)
    wait_for(lambda: JobHandler.sweep_stale_jobs(), timeout=10, interval=0.1)
    worker.signal(signal.SIGCONT)

    wait_for(lambda: f"ran {job.pk}" in worker.output(), timeout=10)
    job = JobHandler.get_job(user, job.pk)
    assert (job.state, job.result) == ("failed", "")
    assert not Marker.objects.filter(name="whole-row").exists()
