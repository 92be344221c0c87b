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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis() -> str:
    """Start a private redis-server on a free port (stopped at exit) and return its URL."""
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
    return f"redis://127.0.0.1:{port}/0"


def setup(*, executor: str | None = None) -> str:
    """Start Redis, configure and set up Django, migrate; returns the Redis URL."""
    url = start_redis()
    os.environ["TASK_FERRY_BENCH_REDIS_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.fastpath.settings"
    if executor:
        os.environ["TASK_FERRY_BENCH_EXECUTOR"] = executor
    sys.path.insert(0, ROOT)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return url


def bench_user():  # type: ignore[no-untyped-def]
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username="fastpath-bench")
    return user


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


def start_worker(executor: str) -> subprocess.Popen[bytes]:
    """Start a worker process of ``executor`` (stopped at exit), ready to run jobs."""
    import redis

    env = {**os.environ, "PYTHONPATH": ROOT}
    client = redis.Redis.from_url(os.environ["TASK_FERRY_BENCH_REDIS_URL"])
    client.delete("bench:worker-ready")
    if executor == PROCESS_EXECUTOR:
        command = [sys.executable, "-m", "bench.fastpath.worker"]
    else:
        raise SystemExit(f"No worker known for executor {executor!r}.")
    proc = subprocess.Popen(command, env=env, cwd=ROOT)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    atexit.register(stop)
    deadline = time.monotonic() + 60
    while not client.exists("bench:worker-ready"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("The worker did not start.")
        time.sleep(0.05)
    return proc


PROCESS_EXECUTOR = "bench.fastpath.worker.RedisListExecutor"
