"""Spare loopback ports for the servers the tests start (redis-server, PgBouncer, runserver)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago, and nothing listens on now
    unless a test starts a server there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
