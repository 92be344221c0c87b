"""A redis-server of the test's own, on a free port: one the test may stop and start again, or
freeze."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from tests.ports import free_port
from tests.waiting import wait_for


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it, on the same port as before, and return once it answers PING."""
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                *("--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            wait_for(self._ping(client), timeout=10, what=f"redis-server on port {self.port}")
        finally:
            client.close()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Stopped with SIGSTOP for the block: it takes connections and answers nothing, as a
        frozen Redis or a stalled proxy would; its data is kept."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop it (its data is lost); stopping a server that is not running does nothing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    @staticmethod
    def _ping(client: redis.Redis) -> Callable[[], bool]:
        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        return ping
