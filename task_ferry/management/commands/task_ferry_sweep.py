"""``manage.py task_ferry_sweep``: fail jobs whose worker was lost and pending jobs no worker took.

Run it from cron every minute, or as a long-lived process with ``--interval``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.core.management.base import CommandParser
from django.db import close_old_connections

from task_ferry.conf import ferry_settings
from task_ferry.handler import JobHandler
from task_ferry.management.databases import OutageReportingCommand, outage_message
from task_ferry.management.intervals import check_interval

logger = logging.getLogger("task_ferry")


class Command(OutageReportingCommand):
    help = (
        "Fail started jobs whose heartbeat is older than TASK_FERRY['HEARTBEAT_TIMEOUT'] "
        "(worker lost) and pending jobs older than TASK_FERRY['PENDING_TIMEOUT']."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            metavar="SECONDS",
            help="Keep running and sweep every SECONDS (default: sweep once and exit).",
        )

    def handle(self, *args: Any, interval: float | None = None, **options: Any) -> None:
        self.verbosity = int(options.get("verbosity", 1))
        if interval is None:
            self._sweep_once(say_none=True)
            return
        check_interval(interval)
        self.stdout.write(
            f"Sweeping every {interval:g}s (heartbeat timeout "
            f"{ferry_settings.HEARTBEAT_TIMEOUT:g}s). Stop with Ctrl-C."
        )
        # Into a pipe or a file (systemd, Docker, a log file), Python holds stdout back until
        # kilobytes pile up: a long-lived sweeper's lines would show hours late.
        self.stdout.flush()
        try:
            while True:
                started = time.monotonic()
                try:
                    # A long-lived sweeper must survive database restarts between sweeps.
                    close_old_connections()
                    self._sweep_once()
                except Exception as exc:
                    # Keep the sweeper alive through a database outage or a bug in a hook;
                    # retry next round. Logged, so error trackers hear of it; a project that
                    # gives the logger no handler gets it on stderr from Python, once.
                    outage = outage_message(exc)
                    if outage is not None:
                        # One line: a refused connection's traceback, round after round, would
                        # bury the message and say nothing more.
                        logger.error("Sweep failed, retrying in %gs: %s", interval, outage)
                    else:
                        logger.error(
                            "Sweep failed, retrying in %gs: %s: %s",
                            interval,
                            type(exc).__name__,
                            exc,
                            exc_info=True,
                        )
                self.stdout.flush()
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass

    def _sweep_once(self, *, say_none: bool = False) -> None:
        """Sweep, and say what it failed; a round that failed nothing is said only when run
        once (or with -v 2): a sweeper that keeps running would fill its log."""
        failed = JobHandler.sweep_stale_jobs()
        if failed:
            self.stdout.write(f"Failed {failed} stale job(s).")
        elif say_none or self.verbosity > 1:
            self.stdout.write("No stale jobs.")
