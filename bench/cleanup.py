"""Benchmark of ``JobHandler.cleanup_old_jobs()``: time, peak memory and hook calls over many
expired jobs of several types, with live and recent jobs that must survive.

    PYTHONPATH=. python bench/cleanup.py --jobs 100000

Runs on the test settings' database server (TASK_FERRY_TEST_DB, default PostgreSQL) in a
database of its own, ``bench_<NAME>``, created and dropped here. The cleanup runs in a fresh
child process so its peak RSS is the cleanup's own. BENCH_TRACEMALLOC=1 also reports the peak
of Python allocations during the cleanup (slower). ``--hook-ms 20`` makes each hook take that
long, as one removing files from S3 does, and reports the cleanup's transactions (PostgreSQL).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

# Hooks of one type raise for every this-many-th job, to show the run goes on.
RAISE_EVERY = 1000
SURVIVORS = 1000


def setup_django(database: str | None) -> None:
    from django.conf import settings

    if database:
        settings.DATABASES["default"]["NAME"] = database
    import django

    django.setup()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


def populate(jobs: int) -> dict[str, list[int]]:
    import datetime

    from task_ferry.models import JobState
    from tests.reliability.bulk import bulk_jobs

    started = time.perf_counter()
    expired = bulk_jobs(jobs, state=JobState.FINISHED)
    expired_failed = bulk_jobs(jobs // 10, state=JobState.FAILED)
    survivors = (
        bulk_jobs(SURVIVORS, state=JobState.PENDING)
        + bulk_jobs(SURVIVORS, state=JobState.STARTED)
        + bulk_jobs(SURVIVORS, state=JobState.FINISHED, age=datetime.timedelta(days=1))
    )
    print(
        f"created {len(expired) + len(expired_failed)} expired and {len(survivors)} live or "
        f"recent jobs in {time.perf_counter() - started:.1f}s"
    )
    return {"expired": expired + expired_failed, "survivors": survivors}


def naive_cleanup() -> int:
    """The previous implementation, for comparison: hooks on each type's instances, then one
    delete through the base model, whose collector loads each parent row on its own."""
    import datetime

    from django.utils import timezone

    from task_ferry.conf import ferry_settings
    from task_ferry.models import Job
    from task_ferry.registry import job_type_registry

    cutoff = timezone.now() - datetime.timedelta(days=ferry_settings.JOB_EXPIRY_DAYS)
    deleted, last_id = 0, 0
    while True:
        batch = list(
            Job.objects.expired(cutoff)
            .filter(pk__gt=last_id)
            .order_by("pk")
            .values_list("pk", "type")[:500]
        )
        if not batch:
            return deleted
        last_id = batch[-1][0]
        by_type: dict[str, list[int]] = {}
        for pk, type_name in batch:
            by_type.setdefault(type_name, []).append(pk)
        for type_name, ids in by_type.items():
            job_type = job_type_registry.get(type_name)
            for job in job_type.model_class._default_manager.filter(pk__in=ids).iterator():
                try:
                    job_type.before_delete(job)
                except Exception:
                    logging.getLogger("task_ferry").exception("before_delete raised")
        _, per_model = Job.objects.filter(pk__in=[pk for pk, _ in batch]).delete()
        deleted += per_model.get(Job._meta.label, 0)


def measure(naive: bool, hook_seconds: float) -> None:
    """The child process: run the cleanup once and print figures as JSON."""
    from django.db import connection
    from django.db.models import Max

    from task_ferry.handler import JobHandler
    from task_ferry.models import Job
    from task_ferry.registry import job_type_registry

    # One byte per job id, so the bench's own bookkeeping stays small next to the cleanup.
    calls = bytearray((Job.objects.aggregate(top=Max("pk"))["top"] or 0) + 1)
    limited_calls = [0]
    # Per transaction the hooks ran in, how long it had been open when the last of them returned.
    transactions: dict[int, float] = {}

    def counting_before_delete(self: object, job: object) -> None:
        pk = job.pk  # type: ignore[attr-defined]
        calls[pk] = min(calls[pk] + 1, 255)
        if hook_seconds:
            time.sleep(hook_seconds)
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT txid_current(), EXTRACT(EPOCH FROM clock_timestamp() - now())"
                )
                txid, open_for = cursor.fetchone()
            transactions[txid] = max(transactions.get(txid, 0.0), float(open_for))
        if type(self).type != "limited":
            return
        limited_calls[0] += 1
        if limited_calls[0] % RAISE_EVERY == 0:
            raise RuntimeError("hook bug")

    for job_type in job_type_registry.all():
        type(job_type).before_delete = counting_before_delete  # type: ignore[method-assign]
    errors = [0]

    class Counter(logging.Handler):
        # Counts only: a kept record would keep its traceback's frames, and their batches, alive.
        def emit(self, record: logging.LogRecord) -> None:
            errors[0] += 1

    logger = logging.getLogger("task_ferry")
    logger.handlers = [Counter()]
    logger.propagate = False

    trace = os.environ.get("BENCH_TRACEMALLOC") == "1"
    if trace:
        tracemalloc.start()
    baseline = current_rss_mb()
    started = time.perf_counter()
    deleted = naive_cleanup() if naive else JobHandler.cleanup_old_jobs()
    elapsed = time.perf_counter() - started
    python_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    print(
        json.dumps(
            {
                "deleted": deleted,
                "seconds": elapsed,
                "baseline_rss_mb": baseline,
                "peak_rss_mb": peak_rss_mb(),
                "python_peak_mb": python_peak,
                "hook_calls": sum(calls),
                "jobs_hooked": len(calls) - calls.count(0),
                "max_calls_per_job": max(calls, default=0),
                "hook_errors_logged": errors[0],
                "transactions": len(transactions),
                "longest_transaction": max(transactions.values(), default=None),
            }
        )
    )


def run_once(jobs: int, database: str, label: str, naive: bool, hook_ms: float) -> float:
    """Populate, clean up in a child process, check the result; returns jobs per second."""
    from django.db import connection

    from task_ferry.models import Job

    Job.objects.all().delete()
    ids = populate(jobs)
    connection.close()
    command = [sys.executable, __file__, "--measure", database, "--hook-ms", str(hook_ms)]
    command += ["--naive"] if naive else []
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    remaining = set(Job.objects.values_list("pk", flat=True))
    rate: float = figures["deleted"] / figures["seconds"]
    print(
        f"{label}: deleted {figures['deleted']} jobs in {figures['seconds']:.1f}s "
        f"({rate:.0f} jobs/s)"
    )
    print(
        f"  peak RSS {figures['peak_rss_mb']:.1f} MB "
        f"(RSS before the cleanup {figures['baseline_rss_mb']:.1f} MB, "
        f"growth {figures['peak_rss_mb'] - figures['baseline_rss_mb']:.1f} MB)"
    )
    if figures["python_peak_mb"] is not None:
        print(f"  Python heap peak (tracemalloc) {figures['python_peak_mb']:.2f} MB")
    print(
        f"  before_delete: {figures['hook_calls']} calls for {figures['jobs_hooked']} jobs "
        f"(max {figures['max_calls_per_job']} per job); {figures['hook_errors_logged']} "
        f"raising hooks logged"
    )
    if figures["longest_transaction"] is not None:
        print(
            f"  hooks ran in {figures['transactions']} transactions, the longest open "
            f"{figures['longest_transaction']:.1f}s"
        )
    print(
        f"  expired left: {len(remaining & set(ids['expired']))}; live or recent jobs kept: "
        f"{len(remaining & set(ids['survivors']))} of {len(ids['survivors'])}"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="Also time the previous implementation on an identical data set.",
    )
    parser.add_argument(
        "--hook-ms",
        type=float,
        default=0,
        help="Milliseconds each before_delete takes (default 0); reports the transactions.",
    )
    parser.add_argument("--measure", metavar="DATABASE", help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        setup_django(args.measure)
        measure(args.naive, args.hook_ms / 1000)
        return

    setup_django(None)
    from django.db import connection

    base_name = connection.settings_dict["NAME"]
    connection.settings_dict["TEST"]["NAME"] = f"bench_{base_name}"
    database = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        rates = {}
        for naive in [False, True] if args.compare else [False]:
            label = "previous implementation" if naive else "cleanup_old_jobs()"
            rates[naive] = run_once(args.jobs, database, label, naive, args.hook_ms)
        if args.compare:
            print(f"speed-up over the previous implementation: {rates[False] / rates[True]:.1f}x")
    finally:
        connection.creation.destroy_test_db(base_name, verbosity=0)


if __name__ == "__main__":
    main()
