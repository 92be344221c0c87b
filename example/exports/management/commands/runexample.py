"""``manage.py runexample``: everything the example needs, in one command.

Migrates the database, creates the demo user, starts ``db_worker`` as a child process, runs the
development server (or uvicorn with ``--asgi``), and stops the worker when the server stops
(Ctrl-C).
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from project.demo_login import get_demo_user

MANAGE_PY = Path(__file__).resolve().parents[3] / "manage.py"
# Seconds the worker gets to finish its current job before it is stopped hard.
WORKER_GRACE_SECONDS = 5


class Command(BaseCommand):
    help = "Run the example: migrate, create the demo user, start db_worker and the dev server."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "addrport",
            nargs="?",
            default=f"127.0.0.1:{os.environ.get('PORT', '8000')}",
            help="Address and port of the development server (default: 127.0.0.1:$PORT or 8000).",
        )
        parser.add_argument(
            "--asgi",
            action="store_true",
            help="Serve with uvicorn (ASGI) instead of the development server; with REDIS_URL "
            "set, progress bars then get a pushed event stream.",
        )
        parser.add_argument(
            "--worker-interval",
            type=float,
            default=0.5,
            help="Seconds the idle worker waits between looks at the task queue.",
        )

    def handle(
        self, *args: Any, addrport: str, asgi: bool, worker_interval: float, **options: Any
    ) -> None:
        host, port = split_addrport(addrport)
        # Before the worker starts: runserver ends the process at once on a taken port
        # (os._exit), which would leave the worker running on its own.
        check_port_free(host, port)
        call_command("migrate", interactive=False, verbosity=0)
        user = get_demo_user()
        self.stdout.write(f"Database ready; demo user {user.get_username()!r}.")

        worker = subprocess.Popen(
            [
                sys.executable,
                str(MANAGE_PY),
                "db_worker",
                "--no-reload",
                "--no-startup-delay",
                "--interval",
                str(worker_interval),
            ],
            env=os.environ.copy(),
        )
        self.stdout.write(f"db_worker started (pid {worker.pid}).")
        # A plain `kill` must stop the worker too, through the finally clause below.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        signal.signal(signal.SIGINT, self._interrupt)
        self.interrupted = False
        try:
            self.stdout.write(self.style.SUCCESS(f"Open http://{addrport}/ (Ctrl-C to stop)."))
            if asgi:
                self._serve_asgi(addrport)
            else:
                call_command("runserver", addrport, use_reloader=False)
        except KeyboardInterrupt:
            pass
        finally:
            # Ctrl-C reached the worker too (same process group): let it finish on its own.
            self._stop(worker, signalled=self.interrupted)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            # A second Ctrl-C before _stop() ignores them: it reached the worker too, which
            # stops at once. Raised here, it would end this process without waiting for it.
            return
        self.interrupted = True
        raise KeyboardInterrupt

    def _serve_asgi(self, addrport: str) -> None:
        import uvicorn

        host, port = split_addrport(addrport)
        uvicorn.run(
            "project.asgi:application",
            host=host,
            port=port,
            # Open event streams must not hold up Ctrl-C.
            timeout_graceful_shutdown=2,
        )

    def _stop(self, worker: subprocess.Popen[bytes], *, signalled: bool) -> None:
        # A second Ctrl-C must not end this process before its worker: it reaches the worker
        # too (same process group), which then stops at once; here it only cuts no corner.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # db_worker lets its current job finish on the first signal and stops it on the second
        # (the job is failed, "interrupted", for the page to show). Ctrl-C reached the worker
        # already; a plain `kill`, or SIGINT sent to this process alone, did not. So it gets
        # SIGTERM after each grace period, whichever signal it is on, and SIGKILL last.
        if not signalled:
            worker.send_signal(signal.SIGTERM)
        for _signals_sent in range(2):
            try:
                worker.wait(WORKER_GRACE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                worker.send_signal(signal.SIGTERM)
        else:
            try:
                worker.wait(WORKER_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self.stdout.write(f"db_worker stopped (exit code {worker.returncode}).")


def split_addrport(addrport: str) -> tuple[str, int]:
    """``"127.0.0.1:9000"``, ``"[::1]:9000"`` or ``"9000"`` as (host, port)."""
    host, _, port = addrport.rpartition(":")
    if not port.isdigit():
        raise CommandError(f"{addrport!r} is not an address and port, such as 127.0.0.1:9000.")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # As the servers do, so a port left in TIME_WAIT by the last run counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CommandError(
                f"Cannot serve on {host}:{port}: {exc.strerror}. Stop what uses the port, or "
                "pick another one: PORT=9000 make example, or runexample 127.0.0.1:9000."
            ) from exc
