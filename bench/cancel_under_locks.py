"""Cancel under locks: how long ``JobHandler.cancel()`` takes while the running job holds its
own row locked (``SELECT ... FOR UPDATE``) in its open transaction, in a worker process.

    make bench-fastpath            # or: python -m bench.cancel_under_locks [--jobs N]

Also checks that every job then ends cancelled, and prints for contrast how long an ``UPDATE``
of the locked row (what a cancel through the database would do) waits before giving up.
"""

from __future__ import annotations

import argparse
import random
import time

from bench.fastpath.common import EXECUTORS, bench_user, load_note, percentile, setup_worker

# How long the contrast UPDATE may wait for the row lock.
LOCK_TIMEOUT_MS = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--worker", choices=sorted(EXECUTORS), default="celery")
    args = parser.parse_args()
    setup_worker(args.worker)

    import redis
    from django.conf import settings
    from django.db import OperationalError, connection, transaction

    from task_ferry.handler import JobHandler
    from task_ferry.models import Job

    client = redis.Redis.from_url(settings.TASK_FERRY["REDIS_URL"])
    user = bench_user()
    durations = []
    contrast = None
    for n in range(args.jobs):
        job = JobHandler.create_and_start(
            user, "bench_cancel_timing", steps=100_000, tick_delay=0.001, lock_own_row=True
        )
        # The job takes its row lock before its first tick.
        if client.blpop([f"bench:ticking:{job.pk}"], timeout=30) is None:
            raise SystemExit(f"Job {job.pk} never started ticking.")
        if n == 0:
            start = time.perf_counter()
            try:
                with transaction.atomic():
                    with connection.cursor() as cursor:
                        cursor.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                    Job.objects.filter(pk=job.pk).update(progress_state="probe")
            except OperationalError:
                contrast = time.perf_counter() - start
        time.sleep(random.uniform(0.002, 0.01))
        start = time.perf_counter()
        JobHandler.cancel(user, job.pk)
        durations.append(time.perf_counter() - start)
        if client.blpop([f"bench:cancelled:{job.pk}"], timeout=30) is None:
            raise SystemExit(f"Job {job.pk} never ran on_cancelled.")
        assert Job.objects.get(pk=job.pk).state == "cancelled"
    Job.objects.filter(user=user).delete()
    print(load_note())
    print(
        f"cancel under locks via a {args.worker} worker, {args.jobs} jobs holding their row "
        f"lock (target <= 50 ms):"
    )
    print(
        f"  JobHandler.cancel() returned in   p50 {percentile(durations, 50) * 1e3:5.2f} ms  "
        f"p99 {percentile(durations, 99) * 1e3:5.2f} ms  max {max(durations) * 1e3:5.2f} ms; "
        f"all {args.jobs} jobs ended cancelled"
    )
    if contrast is not None:
        print(
            f"  (an UPDATE of the locked row gave up after {contrast * 1e3:.0f} ms, "
            f"lock_timeout = {LOCK_TIMEOUT_MS} ms)"
        )


if __name__ == "__main__":
    main()
