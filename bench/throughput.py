"""Job-layer throughput against bare Celery, end to end, on one Celery worker.

    make bench-throughput
    # or, from the repository root:
    python -m bench.throughput [--jobs 300] [--ticks 5] [--rounds 2] [--producers 1,4]
        [--synchronous-commit off [--synchronous-commit-in producer|worker]]
        [--prepare-threshold none] [--batch] [--breakdown]

Starts its own redis-server (broker and progress store, so Redis INFO commandstats count only
this benchmark) and a ``celery worker --pool=prefork --concurrency=2``. Each round times:

- job layer: from the first ``JobHandler.create_and_start`` until all N jobs show finished in
  PostgreSQL (each job ticks ``--ticks`` times);
- bare Celery: from the first ``send_task`` until N plain tasks doing the same ticks have run
  (each ends with one Redis INCR, so the benchmark can see it is done).

Both are measured with one producer thread (a script or a single request creating job after
job) and with several (concurrent requests of a web server), each in rounds of its own; with
``--batch``, also with the jobs of a round created by one ``create_and_start_many`` call (a
fan-out), against bare tasks sent from one thread.
For each, prints both rates, their ratio (target: job layer >= 50% of bare Celery), and per job
the database queries (producer and worker, counted by a Django execute wrapper in an untimed
round of their own), the Redis commands (commandstats delta) and the CPU time of the whole
machine (every process: producer, worker, PostgreSQL, Redis). Needs PostgreSQL on
127.0.0.1:5432 and ``redis-server`` on PATH; the database TASK_FERRY_TEST_DB_NAME (default
task_ferry_bench) is created if missing.

This module is also the worker's Celery app (``celery -A bench.throughput``).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.workers.celery_settings")
os.environ.setdefault("TASK_FERRY_TEST_DB_NAME", "task_ferry_bench")
os.environ.setdefault("TASK_FERRY_TEST_KEY_PREFIX", "tf-bench")

from celery import Celery, signals  # noqa: E402

from bench.fastpath.common import ensure_database, start_redis_server  # noqa: E402

app = Celery("bench")
app.conf.broker_url = os.environ.get("TASK_FERRY_TEST_BROKER_URL")
app.autodiscover_tasks(["task_ferry"])
# As docs/executors.md recommends: keep database connections across tasks.
app.conf.CELERY_DB_REUSE_MAX = 1000

BARE_DONE_KEY = "bench:bare-done"
QUERY_COUNTS_DIR = os.environ.get("TASK_FERRY_BENCH_COUNTS_DIR")

query_counter = itertools.count()
queries_seen = 0


def count_query(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    global queries_seen
    queries_seen = next(query_counter) + 1
    return execute(sql, params, many, context)


def count_queries_on(sender: Any, connection: Any, **kwargs: Any) -> None:
    # Fired on every reconnect of the same connection object: wrap it once.
    if count_query not in connection.execute_wrappers:
        connection.execute_wrappers.append(count_query)


@app.task(name="bench.bare_ticks", ignore_result=True)
def bare_ticks(ticks: int) -> None:
    """The same work as a benchmark job, without the job layer."""
    tick(ticks)
    bare_redis().incr(BARE_DONE_KEY)


_bare_redis: Any = None


def bare_redis() -> Any:
    global _bare_redis
    if _bare_redis is None:
        import redis

        _bare_redis = redis.Redis.from_url(os.environ["TASK_FERRY_TEST_REDIS_URL"])
    return _bare_redis


def tick(ticks: int) -> Any:
    """The work of one benchmark job or task: a few progress ticks."""
    from task_ferry.progress import Progress

    progress = Progress()
    stage = progress.create_child(represents=100, total=ticks)
    for i in range(ticks):
        stage.increment(state=f"step {i + 1} of {ticks}")
    return progress


def register_job_type() -> None:
    """A job type whose run() only ticks: the same work as a bare task, no writes of its own."""
    from task_ferry.registry import JobType, job_type_registry
    from tests.testapp.models import ScriptedJob

    class TicksJobType(JobType):
        type = "bench_ticks"
        model_class = ScriptedJob

        def run(self, job: Any, progress: Any) -> None:
            stage = progress.create_child(represents=100, total=job.steps)
            for i in range(job.steps):
                stage.increment(state=f"step {i + 1} of {job.steps}")

    if "bench_ticks" not in job_type_registry:
        job_type_registry.register(TicksJobType())


@signals.worker_process_init.connect
def prepare_worker_process(**kwargs: Any) -> None:
    from django.db.backends.signals import connection_created

    connection_created.connect(count_queries_on, weak=False)
    register_job_type()


@signals.task_postrun.connect
def report_queries(**kwargs: Any) -> None:
    # Only in the counting round: a file write per task would slow the timed rounds.
    if QUERY_COUNTS_DIR and Path(QUERY_COUNTS_DIR, COUNTING_FLAG).exists():
        Path(QUERY_COUNTS_DIR, f"{os.getpid()}.count").write_text(str(queries_seen))


COUNTING_FLAG = "counting"


def worker_queries(counts_dir: str) -> int:
    return sum(int(p.read_text() or 0) for p in Path(counts_dir).glob("*.count"))


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine so far (every process: producer, worker, Redis,
    PostgreSQL), from /proc/stat; 0.0 where there is no /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_by_part(worker_pid: int, redis_pid: int) -> collections.Counter[str]:
    """CPU seconds so far of each part of the benchmark, from /proc (empty without it): this
    process (the producer), the Celery worker's main process and its pool processes,
    redis-server, and PostgreSQL (every postgres process, background writers included)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parts: collections.Counter[str] = collections.Counter()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        pid, parent = int(entry.name), int(fields[1])
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if pid == os.getpid():
            parts["producer"] += seconds
        elif pid == worker_pid:
            parts["worker main"] += seconds
        elif parent == worker_pid:
            parts["worker pool"] += seconds
        elif pid == redis_pid:
            parts["redis"] += seconds
        elif name.startswith("postgres"):
            parts["postgresql"] += seconds
    return parts


def command_stats(client: Any) -> collections.Counter[str]:
    stats = client.info("commandstats")
    return collections.Counter(
        {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
    )


def start_worker(queue: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    log = Path(tempfile.mkstemp(prefix="tf-bench-worker-", suffix=".log")[1])
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.throughput",
        "worker",
        "--pool=prefork",
        "--concurrency=2",
        f"--queues={queue}",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--hostname=tf-bench-{uuid.uuid4().hex[:6]}@%h",
    ]
    with log.open("wb") as out:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return worker, log


class Bench:
    def __init__(
        self,
        jobs: int,
        ticks: int,
        queue: str,
        store_redis: Any,
        counts: str,
        producers: int,
        pids: tuple[int, int],
    ) -> None:
        self.pids = pids  # the worker's and redis-server's
        self.producers = producers
        self.jobs = jobs
        self.ticks = ticks
        self.queue = queue
        self.redis = store_redis
        self.counts_dir = counts

    def produce(self, n: int, make_one: Any) -> None:
        """Call ``make_one`` n times, from ``self.producers`` threads (like concurrent requests)."""
        if self.producers == 1:
            for _ in range(n):
                make_one()
            return
        from django.db import connection

        def producer(count: int) -> None:
            try:
                for _ in range(count):
                    make_one()
            finally:
                connection.close()

        shares = [n // self.producers + (i < n % self.producers) for i in range(self.producers)]
        threads = [threading.Thread(target=producer, args=(share,)) for share in shares]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def run_jobs(self, n: int, *, batch: bool = False) -> dict[str, float]:
        """Time n jobs, created one ``create_and_start`` at a time (from ``self.producers``
        threads) or, with ``batch``, by one ``create_and_start_many``."""
        from task_ferry.handler import JobHandler
        from task_ferry.models import Job, JobState

        first_id = (Job.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1
        redis_before = command_stats(self.redis)
        worker_before = worker_queries(self.counts_dir)
        producer_before = queries_seen
        cpu_before = busy_cpu_seconds()
        parts_before = cpu_by_part(*self.pids)
        start = time.perf_counter()
        if batch:
            JobHandler.create_and_start_many(None, "bench_ticks", [{"steps": self.ticks}] * n)
        else:
            self.produce(
                n, lambda: JobHandler.create_and_start(None, "bench_ticks", steps=self.ticks)
            )
        created = time.perf_counter() - start
        producer_queries = queries_seen - producer_before
        finished = Job.objects.filter(pk__gte=first_id, state=JobState.FINISHED)
        polls_before = queries_seen
        wait_until(lambda: finished.count() >= n, 300, "jobs to finish", interval=0.02)
        elapsed = time.perf_counter() - start
        cpu = busy_cpu_seconds() - cpu_before
        parts = cpu_by_part(*self.pids)
        parts.subtract(parts_before)
        polls = queries_seen - polls_before
        # The last worker process reports its count when its task ends; give it a moment.
        time.sleep(0.3)
        redis_delta = command_stats(self.redis) - redis_before
        not_finished = Job.objects.filter(pk__gte=first_id).exclude(state=JobState.FINISHED)
        assert not not_finished.exists(), "some benchmark jobs did not finish"
        return {
            "seconds": elapsed,
            "rate": n / elapsed,
            "n": n,
            "producer_queries": producer_queries / n,
            "worker_queries": (worker_queries(self.counts_dir) - worker_before) / n,
            "redis_commands": (sum(redis_delta.values()) - 1) / n,  # less INFO itself
            "redis_breakdown": redis_delta,  # type: ignore[dict-item]
            "polls": polls,
            "producer_seconds": created,
            "cpu_ms": cpu * 1000 / n,
            "cpu_parts": parts,  # type: ignore[dict-item]
        }

    def run_bare(self, n: int) -> dict[str, float]:
        self.redis.delete(BARE_DONE_KEY)
        redis_before = command_stats(self.redis)
        cpu_before = busy_cpu_seconds()
        parts_before = cpu_by_part(*self.pids)
        start = time.perf_counter()
        self.produce(
            n, lambda: app.send_task("bench.bare_ticks", args=(self.ticks,), queue=self.queue)
        )
        created = time.perf_counter() - start
        polls = 0

        def done() -> bool:
            nonlocal polls
            polls += 1
            return int(self.redis.get(BARE_DONE_KEY) or 0) >= n

        wait_until(done, 300, "bare tasks to finish", interval=0.02)
        elapsed = time.perf_counter() - start
        cpu = busy_cpu_seconds() - cpu_before
        parts = cpu_by_part(*self.pids)
        parts.subtract(parts_before)
        redis_delta = command_stats(self.redis) - redis_before
        return {
            "seconds": elapsed,
            "rate": n / elapsed,
            "n": n,
            "redis_commands": (sum(redis_delta.values()) - polls - 1 - 1) / n,
            "redis_breakdown": redis_delta,  # type: ignore[dict-item]
            "producer_seconds": created,
            "cpu_ms": cpu * 1000 / n,
            "cpu_parts": parts,  # type: ignore[dict-item]
        }


def synchronous_commit_of(side: str, args: argparse.Namespace) -> str:
    """The synchronous_commit of the producer's or the worker's connections."""
    return args.synchronous_commit if args.synchronous_commit_in in ("both", side) else "on"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="print Redis commands by name and CPU time by process",
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help="also time the jobs created by one create_and_start_many call per round",
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=["on", "off"],
        default="on",
        help="PostgreSQL synchronous_commit of the benchmark's connections (default: on)",
    )
    parser.add_argument(
        "--synchronous-commit-in",
        choices=["both", "producer", "worker"],
        default="both",
        help=(
            "whose connections --synchronous-commit applies to; the others keep on, to see "
            "which side's disk flushes cost what (default: both)"
        ),
    )
    parser.add_argument(
        "--producers",
        type=producer_counts,
        default=[1, 4],
        help=(
            "threads calling create_and_start / send_task, like concurrent requests; a "
            "comma-separated list measures each in turn (default: 1,4)"
        ),
    )
    parser.add_argument(
        "--prepare-threshold",
        type=prepare_threshold,
        default=5,
        help=(
            "psycopg prepare_threshold in the database OPTIONS of producer and worker, as "
            "docs/executors.md recommends without a transaction-mode pooler; 'none' turns "
            "prepared statements off, Django's default (default: 5)"
        ),
    )
    parser.add_argument(
        "--conn-max-age",
        type=int,
        default=600,
        help="CONN_MAX_AGE of producer and worker (0 reconnects for every task; default: 600)",
    )
    args = parser.parse_args()

    ensure_database(os.environ["TASK_FERRY_TEST_DB_NAME"])
    server, redis_url = start_redis_server()  # stopped at exit
    redis_server = redis_url.removesuffix("/0")
    counts_dir = tempfile.mkdtemp(prefix="tf-bench-queries-")
    queue = f"tf-bench-{uuid.uuid4().hex[:8]}"
    os.environ.update(
        TASK_FERRY_TEST_REDIS_URL=f"{redis_server}/0",
        TASK_FERRY_TEST_BROKER_URL=f"{redis_server}/1",
        TASK_FERRY_TEST_STORE="redis",
        TASK_FERRY_TEST_DB="postgresql",
        TASK_FERRY_BENCH_COUNTS_DIR=counts_dir,
        TASK_FERRY_TEST_SYNCHRONOUS_COMMIT=synchronous_commit_of("producer", args),
        TASK_FERRY_TEST_CONN_MAX_AGE=str(args.conn_max_age),
    )
    if args.prepare_threshold is None:
        os.environ.pop("TASK_FERRY_TEST_PREPARE_THRESHOLD", None)
    else:
        os.environ["TASK_FERRY_TEST_PREPARE_THRESHOLD"] = str(args.prepare_threshold)
    app.conf.broker_url = os.environ["TASK_FERRY_TEST_BROKER_URL"]
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        TASK_FERRY_TEST_SYNCHRONOUS_COMMIT=synchronous_commit_of("worker", args),
    )
    worker = None
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.core.management import call_command
        from django.db.backends.signals import connection_created

        call_command("migrate", verbosity=0)
        settings.TASK_FERRY = {
            **settings.TASK_FERRY,
            "EXECUTOR": "task_ferry.executors.celery.CeleryExecutor",
            "CELERY_QUEUE": queue,
        }
        from task_ferry.conf import ferry_settings
        from task_ferry.models import Job

        ferry_settings.reload()
        register_job_type()
        from django.db import connection

        # Jobs of earlier runs, all tables of every job type; TRUNCATE instead of the ORM's
        # delete(), which takes a minute once tens of thousands have piled up.
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {connection.ops.quote_name(Job._meta.db_table)} CASCADE")

        count_queries_on(None, connection)
        connection_created.connect(count_queries_on, weak=False)

        worker, log = start_worker(queue, env)
        import redis

        store_redis = redis.Redis.from_url(os.environ["TASK_FERRY_TEST_REDIS_URL"])
        bench = Bench(
            args.jobs,
            args.ticks,
            queue,
            store_redis,
            counts_dir,
            1,  # for the warm-up and the counting round; each measured set sets its own
            (worker.pid, server.pid),
        )
        # Warm up both paths (worker imports, connections, the prefork pool), then count the
        # database queries per job in a round of their own, untimed.
        counting = Path(counts_dir, COUNTING_FLAG)
        counting.touch()
        bench.run_jobs(20)
        bench.run_bare(20)
        counted = bench.run_jobs(args.jobs)
        counting.unlink()

        # One producer thread or several, each calling create_and_start; then, with --batch,
        # one create_and_start_many call (producers = 0 in the report).
        for producers in [*args.producers, *([0] if args.batch else [])]:
            bench.producers = max(producers, 1)
            job_rounds: list[dict[str, Any]] = []
            bare_rounds: list[dict[str, Any]] = []
            for i in range(args.rounds):
                bare_rounds.append(bench.run_bare(args.jobs))
                job_rounds.append(bench.run_jobs(args.jobs, batch=producers == 0))
                bare, jobs = bare_rounds[-1], job_rounds[-1]
                print(
                    f"{describe(producers)}, round {i + 1}: bare {bare['rate']:6.1f}/s "
                    f"({bare['seconds']:.2f}s, sending {bare['producer_seconds']:.2f}s)  jobs "
                    f"{jobs['rate']:6.1f}/s ({jobs['seconds']:.2f}s, creating "
                    f"{jobs['producer_seconds']:.2f}s)",
                    flush=True,
                )
            report(args, producers, counted, job_rounds, bare_rounds)
        if worker.poll() is not None:
            print(log.read_text(), file=sys.stderr)
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(30)
        server.terminate()
        server.wait(10)


def describe(producers: int) -> str:
    """How the jobs of a set of rounds are created (0: one create_and_start_many call)."""
    if producers == 0:
        return "one create_and_start_many (bare: 1 producer)"
    return f"{producers} producer(s)"


def prepare_threshold(text: str) -> int | None:
    """``--prepare-threshold``: "none" -> None (Django's default), "5" -> 5."""
    if text.lower() == "none":
        return None
    try:
        threshold = int(text)
    except ValueError:
        threshold = -1
    if threshold < 0:
        raise argparse.ArgumentTypeError(f"expected 'none' or a number >= 0, not {text!r}")
    return threshold


def producer_counts(text: str) -> list[int]:
    """``--producers``: "1,4" -> [1, 4]."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4, got {text!r}")
    return counts


def report(
    args: Any,
    producers: int,
    counted: dict[str, Any],
    job_rounds: list[dict[str, Any]],
    bare_rounds: list[dict[str, Any]],
) -> None:
    job_rate = statistics.median(r["rate"] for r in job_rounds)
    bare_rate = statistics.median(r["rate"] for r in bare_rounds)
    ratio = job_rate / bare_rate
    last_job, last_bare = job_rounds[-1], bare_rounds[-1]
    print()
    print(
        f"N={args.jobs} jobs of {args.ticks} ticks, celery worker --pool=prefork "
        f"--concurrency=2, Redis broker, {args.rounds} round(s), medians, "
        f"synchronous_commit={synchronous_commit_of('producer', args)} (producer) / "
        f"{synchronous_commit_of('worker', args)} (worker), CONN_MAX_AGE={args.conn_max_age}, "
        f"prepare_threshold={args.prepare_threshold}, "
        + (f"{producers} producer thread(s)" if producers else "jobs: one create_and_start_many")
    )
    print(f"bare Celery   {bare_rate:8.1f} tasks/s")
    print(f"job layer     {job_rate:8.1f} jobs/s")
    print(f"ratio         {ratio:8.1%}  (target >= 50%)  {'OK' if ratio >= 0.5 else 'BELOW'}")
    # The batch rounds count their own producer's queries (a few for all the jobs).
    creating = last_job["producer_queries"] if producers == 0 else counted["producer_queries"]
    print(
        f"DB queries per job: {creating:.2f} at "
        f"{'create_and_start_many' if producers == 0 else 'create_and_start'}, "
        f"{counted['worker_queries']:.1f} in the worker"
    )
    print(
        f"Redis commands per job: {last_job['redis_commands']:.1f} "
        f"(bare Celery: {last_bare['redis_commands']:.1f} per task)"
    )
    print(
        f"CPU per job, whole machine: {statistics.median(r['cpu_ms'] for r in job_rounds):.2f} ms "
        f"(bare Celery: {statistics.median(r['cpu_ms'] for r in bare_rounds):.2f} ms per task)"
    )
    if args.breakdown:
        print("  CPU per job by part, medians of the rounds (bare Celery in brackets):")
        names = ("producer", "worker main", "worker pool", "postgresql", "redis")
        print(
            "    "
            + ", ".join(
                f"{name} {median_part(job_rounds, name):.2f} "
                f"({median_part(bare_rounds, name):.2f}) ms"
                for name in names
            )
        )
        for name, breakdown in (("job", last_job), ("bare", last_bare)):
            counts = breakdown["redis_breakdown"]
            print(
                f"  {name}: "
                + ", ".join(f"{k} {v / args.jobs:.2f}" for k, v in counts.most_common())
            )


def median_part(rounds: list[dict[str, Any]], name: str) -> float:
    """The median over the rounds of one part's CPU milliseconds per job."""
    return statistics.median(r["cpu_parts"][name] * 1000 / r["n"] for r in rounds)


if __name__ == "__main__":
    main()
