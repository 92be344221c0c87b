"""A real ASGI server (uvicorn) on a free loopback port, for tests and benchmarks."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

from task_ferry.executors.base import BaseExecutor
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


class HoldExecutor(BaseExecutor):
    """Takes jobs and runs none: the test or benchmark moves them along itself."""

    def enqueue(self, job_id: int) -> None:
        pass


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a server that shares this process's test database and store keys."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        DJANGO_SETTINGS_MODULE="tests.settings_live",
        TASK_FERRY_TEST_DB_NAME=connection.settings_dict["NAME"],
        TASK_FERRY_TEST_KEY_PREFIX=settings.TASK_FERRY["KEY_PREFIX"],
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def uvicorn_server(*, timeout: float = 30, args: tuple[str, ...] = (), **env: str):
    """Yield the base URL of a uvicorn process serving ``tests.asgi`` until the block ends.
    ``args``: more options of uvicorn's command line."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            *args,
        ],
        cwd=ROOT,
        env=server_env(**env),
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start listening in time")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def session_headers(user) -> dict[str, str]:
    """Headers of a browser logged in as ``user``: session cookie, CSRF cookie and token."""
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    session = client.cookies[settings.SESSION_COOKIE_NAME].value
    # Any 32-character secret works when cookie and header agree.
    csrf = "t" * 32
    return {
        "Cookie": f"{settings.SESSION_COOKIE_NAME}={session}; {settings.CSRF_COOKIE_NAME}={csrf}",
        "X-CSRFToken": csrf,
    }
