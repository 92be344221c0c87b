"""Freshness: how long after a running job reaches a value the API shows it.

    make bench-fastpath            # or: python -m bench.freshness [--seconds S]

A job runs in a worker process (``--worker celery`` by default, or ``db_worker`` / ``process``)
or in a thread of this process (``--worker thread``, immediate executor: the job then competes
with the poller for the GIL), its transaction open and holding a row it wrote, and notes when
it reached each tick. This process polls ``GET /api/jobs/<id>/`` with DRF's test client, back
to back. For each tick, the latency is the
time from the job reaching it to the end of the first poll, started after that moment, whose
``progress_state`` shows it or a later tick. Only polls that saw ``state == "started"`` count:
the job's transaction was still open. Two jobs: one pausing 1 ms before each tick (I/O-bound
work) and one ticking flat out (CPU-bound work, competing with the monitor thread for the GIL).
"""

from __future__ import annotations

import argparse
import bisect
import json
import threading
import time

from bench.fastpath.common import EXECUTORS, bench_user, load_note, percentile, setup, setup_worker


def measure(user, *, worker: str, steps: int, tick_delay: float):  # type: ignore[no-untyped-def]
    import redis
    from django.conf import settings
    from django.db import connection
    from django.test.utils import override_settings
    from rest_framework.test import APIClient

    from bench.fastpath.job_types import reached_at, record_every
    from task_ferry.handler import JobHandler
    from task_ferry.models import Job

    client = APIClient()
    client.force_authenticate(user)
    store = redis.Redis.from_url(settings.TASK_FERRY["REDIS_URL"])

    def run() -> None:
        try:
            immediate = "task_ferry.executors.immediate.ImmediateExecutor"
            with override_settings(TASK_FERRY={**settings.TASK_FERRY, "EXECUTOR": immediate}):
                JobHandler.create_and_start(
                    user, "bench_timed_ticks", steps=steps, tick_delay=tick_delay
                )
        finally:
            connection.close()

    if worker == "thread":
        reached_at.clear()
        thread = threading.Thread(target=run)
        thread.start()
        while not reached_at:
            time.sleep(0.0005)
        job_id = next(iter(reached_at))
        running = thread.is_alive
    else:
        job_id = JobHandler.create_and_start(
            user, "bench_timed_ticks", steps=steps, tick_delay=tick_delay
        ).pk
        if store.blpop([f"bench:ticking:{job_id}"], timeout=60) is None:
            raise SystemExit(f"Job {job_id} never started ticking.")

        def running() -> bool:
            return not Job.objects.filter(pk=job_id, state="finished").exists()

    polls: list[tuple[float, float, int]] = []
    while True:
        asked = time.time()
        body = client.get(f"/api/jobs/{job_id}/").json()
        answered = time.time()
        label = body["progress_state"]
        if body["state"] == "started" and label.startswith("row "):
            polls.append((asked, answered, int(label[4:])))
        elif body["state"] != "started" and not running():
            break
    if worker == "thread":
        thread.join()
        times = reached_at[job_id]
    else:
        times = json.loads(store.get(f"bench:reached:{job_id}"))
    asked_at = [p[0] for p in polls]
    latencies = []
    every = record_every(tick_delay)
    for index, reached in enumerate(times):
        tick = index * every
        first = bisect.bisect_left(asked_at, reached)
        for _asked, answered, seen in polls[first:]:
            if seen >= tick:
                latencies.append(answered - reached)
                break
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--worker",
        choices=["thread", *EXECUTORS],
        default="celery",
        help="where the job runs: a thread of this process, or a worker process",
    )
    args = parser.parse_args()
    if args.worker == "thread":
        setup()
    else:
        setup_worker(args.worker)
    from task_ferry.conf import ferry_settings

    user = bench_user()
    print(load_note())
    print(
        f"freshness through GET /api/jobs/<id>/, job in a {args.worker}"
        f"{' of this process' if args.worker == 'thread' else ' worker'} (PUBLISH_INTERVAL = "
        f"{ferry_settings.PUBLISH_INTERVAL * 1000:g} ms), target p99 <= 100 ms:"
    )
    cases = [
        ("1 ms pause before each tick", int(args.seconds * 900), 0.001),
        ("ticking flat out", int(args.seconds * 1_500_000), 0.0),
    ]
    for name, steps, delay in cases:
        latencies = measure(user, worker=args.worker, steps=steps, tick_delay=delay)
        print(
            f"  {name:30s} {len(latencies):6d} ticks sampled  "
            f"p50 {percentile(latencies, 50) * 1e3:6.1f} ms  "
            f"p99 {percentile(latencies, 99) * 1e3:6.1f} ms  "
            f"max {max(latencies) * 1e3:6.1f} ms"
        )


if __name__ == "__main__":
    main()
