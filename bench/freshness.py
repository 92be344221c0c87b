"""Freshness: how long after a running job reaches a value the API shows it.

    make bench-fastpath            # or: python -m bench.freshness [--seconds S]

A job runs in a thread of this process (immediate executor, its transaction open and holding a
row it wrote) and notes when it reached each tick. The main thread polls
``GET /api/jobs/<id>/`` with DRF's test client, back to back. For each tick, the latency is the
time from the job reaching it to the end of the first poll, started after that moment, whose
``progress_state`` shows it or a later tick. Only polls that saw ``state == "started"`` count:
the job's transaction was still open. Two jobs: one pausing 1 ms before each tick (I/O-bound
work) and one ticking flat out (CPU-bound work, competing with the poller for the GIL).
"""

from __future__ import annotations

import argparse
import bisect
import threading
import time

from bench.fastpath.common import bench_user, load_note, percentile, setup


def measure(user, *, steps: int, tick_delay: float, sample_every: int) -> list[float]:  # type: ignore[no-untyped-def]
    from django.db import connection
    from rest_framework.test import APIClient

    from bench.fastpath.job_types import reached_at
    from task_ferry.handler import JobHandler

    reached_at.clear()
    client = APIClient()
    client.force_authenticate(user)

    def run() -> None:
        try:
            JobHandler.create_and_start(
                user, "bench_timed_ticks", steps=steps, tick_delay=tick_delay
            )
        finally:
            connection.close()

    worker = threading.Thread(target=run)
    worker.start()
    while not reached_at:
        time.sleep(0.0005)
    job_id = next(iter(reached_at))
    polls: list[tuple[float, float, int]] = []
    while worker.is_alive():
        asked = time.perf_counter()
        body = client.get(f"/api/jobs/{job_id}/").json()
        answered = time.perf_counter()
        label = body["progress_state"]
        if body["state"] == "started" and label.startswith("row "):
            polls.append((asked, answered, int(label[4:])))
    worker.join()
    times = reached_at[job_id]
    asked_at = [p[0] for p in polls]
    latencies = []
    for tick in range(0, len(times), sample_every):
        reached = times[tick]
        first = bisect.bisect_left(asked_at, reached)
        for _asked, answered, seen in polls[first:]:
            if seen >= tick:
                latencies.append(answered - reached)
                break
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    setup()
    from task_ferry.conf import ferry_settings

    user = bench_user()
    print(load_note())
    print(
        f"freshness through GET /api/jobs/<id>/ (PUBLISH_INTERVAL = "
        f"{ferry_settings.PUBLISH_INTERVAL * 1000:g} ms), target p99 <= 100 ms:"
    )
    cases = [
        ("1 ms pause before each tick", int(args.seconds * 900), 0.001, 1),
        ("ticking flat out", int(args.seconds * 1_500_000), 0.0, 1000),
    ]
    for name, steps, delay, sample_every in cases:
        latencies = measure(user, steps=steps, tick_delay=delay, sample_every=sample_every)
        print(
            f"  {name:30s} {len(latencies):6d} ticks sampled  "
            f"p50 {percentile(latencies, 50) * 1e3:6.1f} ms  "
            f"p99 {percentile(latencies, 99) * 1e3:6.1f} ms  "
            f"max {max(latencies) * 1e3:6.1f} ms"
        )


if __name__ == "__main__":
    main()
