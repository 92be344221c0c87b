"""Job types the benchmarks run. They reuse the test app's ScriptedJob table: ``steps`` is the
number of ticks and ``tick_delay`` the pause before each one."""

import json
import os
import time

import redis

from task_ferry.registry import JobType
from tests.testapp.models import Marker, ScriptedJob

# Job id -> time.time() when the job reached every record_every()-th tick (freshness).
reached_at: dict[int, list[float]] = {}


class TicksJobType(JobType):
    """The issue's tick-cost job: one child stage, one labelled tick per row."""

    type = "bench_ticks"
    model_class = ScriptedJob

    def run(self, job, progress):
        child = progress.create_child(represents=100, total=job.steps)
        for i in range(job.steps):
            child.increment(state=f"row {i}")


class TimedTicksJobType(JobType):
    """Ticks with a pause before each tick, inside an open transaction that has already
    written a row, and notes when it reached every ``RECORD_EVERY``-th tick."""

    type = "bench_timed_ticks"
    model_class = ScriptedJob

    def run(self, job, progress):
        Marker.objects.create(name=f"bench {job.pk}")
        times = reached_at.setdefault(job.pk, [])
        child = progress.create_child(represents=100, total=job.steps)
        delay = job.tick_delay
        every = record_every(delay)
        clock = time.time
        _client().rpush(f"bench:ticking:{job.pk}", "1")
        for i in range(job.steps):
            if delay:
                time.sleep(delay)
            child.increment(state=f"row {i}")
            if not i % every:
                times.append(clock())
        # For a benchmark in another process; still inside the open transaction.
        _client().set(f"bench:reached:{job.pk}", json.dumps(times))


def record_every(tick_delay: float) -> int:
    """Noting every tick of a job ticking flat out would make the notes the main cost."""
    return 1 if tick_delay else 1000


class CancelTimingJobType(JobType):
    """Ticks every ``tick_delay`` seconds, optionally holding its own row lock, and records the
    wall-clock time its ``on_cancelled`` hook ran in Redis for the benchmark to read."""

    type = "bench_cancel_timing"
    model_class = ScriptedJob

    def run(self, job, progress):
        if job.lock_own_row:
            ScriptedJob.objects.select_for_update().get(pk=job.pk)
        child = progress.create_child(represents=100, total=job.steps)
        for i in range(job.steps):
            time.sleep(job.tick_delay)
            child.increment(state=f"row {i}")
            if i == 0:
                _client().rpush(f"bench:ticking:{job.pk}", "1")

    def on_cancelled(self, job):
        ran_at = time.time()
        _client().rpush(f"bench:cancelled:{job.pk}", repr(ran_at))


def _client() -> redis.Redis:
    # Lists, so the benchmark can block on them (BLPOP) instead of polling during the timing.
    return redis.Redis.from_url(os.environ["TASK_FERRY_BENCH_REDIS_URL"])
