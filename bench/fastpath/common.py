"""What every fast-path benchmark needs: a redis-server of its own, Django set up on the
helper's database, a user, and percentiles."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from tests.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_redis() -> str:
    """Start a private redis-server on a free port (stopped at exit) and return its URL."""
    return start_redis_server()[1]


def start_redis_server() -> tuple[subprocess.Popen[bytes], str]:
    """``start_redis()``, returning the server's process too (for its pid)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tf-bench-redis-")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(stop)
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            break
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def setup(*, executor: str | None = None) -> str:
    """Start Redis, configure and set up Django, migrate; returns the Redis URL."""
    url = start_redis()
    os.environ["TASK_FERRY_BENCH_REDIS_URL"] = url
    os.environ.setdefault("TASK_FERRY_TEST_DB_NAME", "task_ferry_bench")
    if os.environ.get("TASK_FERRY_TEST_DB", "postgresql") == "postgresql":
        ensure_database(os.environ["TASK_FERRY_TEST_DB_NAME"])
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.fastpath.settings"
    if executor:
        os.environ["TASK_FERRY_BENCH_EXECUTOR"] = executor
    os.environ["TASK_FERRY_TEST_BROKER_URL"] = url.removesuffix("/0") + "/1"
    sys.path.insert(0, ROOT)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return url


def ensure_database(name: str) -> None:
    """Create the benchmark's PostgreSQL database if it does not exist yet."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def bench_user():  # type: ignore[no-untyped-def]
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username="fastpath-bench")
    return user


def load_note() -> str:
    """The machine's load, printed with each figure: other processes share its two cores."""
    one, five, _ = os.getloadavg()
    return f"(load average {one:.2f}, {five:.2f} over 1 and 5 min, {os.cpu_count()} CPUs)"


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


class CommandCounter:
    """Counts the commands a Redis server ran (INFO commandstats), on one connection of its
    own so that counting adds nothing but the INFO calls it leaves out."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.client.ping()

    def total(self) -> int:
        stats = self.client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")

    def by_command(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


# The executors a benchmark can measure through, by the name of their worker.
EXECUTORS = {
    "celery": "task_ferry.executors.celery.CeleryExecutor",
    "db_worker": "task_ferry.executors.django_tasks.DjangoTasksExecutor",
    "process": "bench.fastpath.worker.RedisListExecutor",
}


def setup_worker(kind: str) -> None:
    """Set up Django for ``kind``'s executor, start one worker process of that kind (stopped at
    exit) and wait until it has run a job."""
    setup(executor=EXECUTORS[kind])
    from django.conf import settings

    env = {**os.environ, "PYTHONPATH": ROOT}
    if kind == "celery":
        # The producer side: the project's Celery app, as a project's celery.py makes it.
        import tests.celery_app  # noqa: F401

        command = [
            *(sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker"),
            *("--pool=prefork", "--concurrency=1", "--loglevel=WARNING"),
            f"--queues={settings.TASK_FERRY['CELERY_QUEUE']}",
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            f"--hostname=fastpath-bench-{os.getpid()}@%h",
        ]
    elif kind == "db_worker":
        command = [
            *(sys.executable, "-m", "django", "db_worker"),
            *("--backend", settings.TASK_FERRY["TASKS_BACKEND"], "--queue-name", "*"),
            *("--interval", "0.05", "--no-startup-delay", "--no-reload"),
        ]
    else:
        command = [sys.executable, "-m", "bench.fastpath.worker"]
    # Kept open for the worker's lifetime; closed and removed by stop().
    log = tempfile.NamedTemporaryFile(prefix=f"tf-bench-{kind}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        os.unlink(log.name)

    atexit.register(stop)
    from task_ferry.handler import JobHandler
    from task_ferry.models import Job

    job = JobHandler.create_and_start(bench_user(), "bench_ticks", steps=1)
    deadline = time.monotonic() + 60
    while Job.objects.get(pk=job.pk).state != "finished":
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"The {kind} worker did not run a job; its log is {log.name}.")
        time.sleep(0.05)
