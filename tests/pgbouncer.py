"""PgBouncer in transaction mode in front of PostgreSQL, the pooler many Django deployments
use: for one test (the ``pgbouncer`` fixture of tests/reliability) or for the whole suite.

    python -m tests.pgbouncer [pytest arguments]

runs pytest with every connection of the test project, and of the workers it starts, going
through a PgBouncer of its own on a spare port (``make test-pgbouncer``). Tests marked
``direct_connection`` need a server connection of their own (startup options, the session's
prepared statements, a killed backend) and are left out. The test database is created through
the pooler and dropped directly afterwards: PgBouncer keeps server connections to it open.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.ports import free_port

PGBOUNCER = next((p for p in ("pgbouncer", "/usr/sbin/pgbouncer") if shutil.which(p)), "pgbouncer")
SERVER_HOST, SERVER_PORT, SERVER_USER = "127.0.0.1", 5432, "postgres"


class PgBouncer:
    """A PgBouncer of our own on a spare port, in transaction mode, in front of a PostgreSQL
    server: a client's transactions go to whichever server connection is free, so nothing a
    session sets or holds outside a transaction is seen by its next one."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        #: The PostgreSQL server's port, behind it.
        self.server_port = 0

    def start(self, host: str, server_port: int, user: str) -> None:
        self.server_port = server_port
        config = self.directory / "pgbouncer.ini"
        users = self.directory / "users.txt"
        users.write_text(f'"{user}" ""\n')
        config.write_text(
            "[databases]\n"
            f"* = host={host} port={server_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\n"
            "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 500\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        command = [PGBOUNCER, str(config)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root; the user it switches to must read its files.
            command[1:1] = ["-u", "postgres"]
            for path in (self.directory, config, users):
                path.chmod(0o755 if path.is_dir() else 0o644)
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PgBouncer did not start ({' '.join(command)})")
            time.sleep(0.05)

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def drop_database(name: str) -> None:
    """Drop ``name`` on the server itself, whoever is still connected to it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=SERVER_HOST, port=SERVER_PORT, user=SERVER_USER, dbname="postgres", autocommit=True
    ) as server:
        server.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def main(pytest_args: list[str]) -> int:
    if not shutil.which(PGBOUNCER):
        print("pgbouncer is not installed (Debian: apt-get install pgbouncer)", file=sys.stderr)
        return 1
    test_database = os.environ.get("TASK_FERRY_TEST_DB_TEST_NAME", "test_task_ferry_pgbouncer")
    bouncer = PgBouncer(free_port(), Path(tempfile.mkdtemp(prefix="tf-pgbouncer-")))
    bouncer.start(SERVER_HOST, SERVER_PORT, SERVER_USER)
    env = dict(
        os.environ,
        TASK_FERRY_TEST_DB="postgresql",
        TASK_FERRY_TEST_DB_PORT=str(bouncer.port),
        TASK_FERRY_TEST_DB_NAME=os.environ.get("TASK_FERRY_TEST_DB_NAME", "task_ferry_pgbouncer"),
        TASK_FERRY_TEST_DB_TEST_NAME=test_database,
    )
    # The test project's replica alias has a test database of its own (tests/settings.py).
    test_databases = [test_database, f"{test_database}_replica"]
    try:
        for name in test_databases:
            drop_database(name)  # left by a run that was killed
        # --reuse-db: pytest-django would drop the databases through the pooler, which still
        # holds connections to them.
        command = [sys.executable, "-m", "pytest", "--reuse-db", "-m", "not direct_connection"]
        return subprocess.call([*command, *pytest_args], env=env)
    finally:
        bouncer.stop()
        for name in test_databases:
            drop_database(name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
