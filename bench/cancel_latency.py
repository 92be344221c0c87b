"""Cancel latency through a real worker process: from ``JobHandler.cancel()`` returning to the
job's ``on_cancelled`` running in the worker, with the job ticking once per 1 ms.

    make bench-fastpath            # or: python -m bench.cancel_latency [--jobs N]

The worker is a ``celery worker`` (prefork, one child) on a private Redis broker by default;
``--worker db_worker`` uses django-tasks' ``db_worker`` and ``--worker process`` a bare process
running ``JobHandler.run_job`` on ids it pops from Redis. ``on_cancelled`` records
``time.time()`` in Redis; this process compares it with the moment ``cancel()`` returned (the
same machine, so the same clock).
"""

from __future__ import annotations

import argparse
import random
import time

from bench.fastpath.common import EXECUTORS, bench_user, load_note, percentile, setup_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--worker", choices=sorted(EXECUTORS), default="celery")
    args = parser.parse_args()
    setup_worker(args.worker)

    import redis
    from django.conf import settings

    from task_ferry.handler import JobHandler
    from task_ferry.models import Job

    client = redis.Redis.from_url(settings.TASK_FERRY["REDIS_URL"])
    user = bench_user()
    latencies, cancel_calls = [], []
    for _ in range(args.jobs):
        job = JobHandler.create_and_start(
            user, "bench_cancel_timing", steps=100_000, tick_delay=0.001
        )
        if client.blpop([f"bench:ticking:{job.pk}"], timeout=30) is None:
            raise SystemExit(f"Job {job.pk} never started ticking.")
        # Let it tick a little, at a moment unrelated to its tick rhythm.
        time.sleep(random.uniform(0.005, 0.015))
        called = time.time()
        JobHandler.cancel(user, job.pk)
        returned = time.time()
        cancel_calls.append(returned - called)
        popped = client.blpop([f"bench:cancelled:{job.pk}"], timeout=30)
        if popped is None:
            raise SystemExit(f"Job {job.pk} never ran on_cancelled.")
        latencies.append(float(popped[1]) - returned)
        assert Job.objects.get(pk=job.pk).state == "cancelled"
    Job.objects.filter(user=user).delete()
    print(load_note())
    print(
        f"cancel latency via a {args.worker} worker, {args.jobs} jobs ticking every 1 ms "
        f"(targets p50 <= 2 ms, p99 <= 20 ms):"
    )
    print(
        f"  cancel() returned -> on_cancelled ran   p50 {percentile(latencies, 50) * 1e3:5.2f} ms"
        f"  p99 {percentile(latencies, 99) * 1e3:5.2f} ms  max {max(latencies) * 1e3:5.2f} ms"
    )
    print(
        f"  JobHandler.cancel() call itself         p50 "
        f"{percentile(cancel_calls, 50) * 1e3:5.2f} ms  p99 "
        f"{percentile(cancel_calls, 99) * 1e3:5.2f} ms"
    )


if __name__ == "__main__":
    main()
