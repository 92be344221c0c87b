"""Show pending and running jobs with their progress, once or continuously."""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import textwrap
from collections.abc import Iterable
from time import monotonic, sleep
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from task_ferry.checks import unswept_jobs_warning
from task_ferry.conf import ferry_settings
from task_ferry.exceptions import JobTypeDoesNotExist, ProgressStoreUnavailable
from task_ferry.management.databases import OutageReportingCommand
from task_ferry.management.intervals import check_interval
from task_ferry.models import Heartbeat, Job
from task_ferry.registry import job_type_registry
from task_ferry.snapshot import snapshot_of
from task_ferry.stores.base import get_store

# More lines than a terminal or a log wants; a limit past the database's integers would fail.
MAX_LIMIT = 10_000

# Seconds between two counts of unswept jobs (W007) under --watch: each counts the live jobs,
# and the warning is about jobs minutes past their timeouts.
SWEEP_WARNING_INTERVAL = 60.0

# Cursor up to the first line of the previous frame, then clear to the end of the screen.
REDRAW = "\x1b[{lines}F\x1b[J"


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobLine:
    """One job as the command shows it."""

    id: int
    type: str
    owner: str
    state: str
    percentage: int
    label: str
    started_at: datetime.datetime | None
    #: The job's last heartbeat; None before its first, and for jobs not running.
    last_beat_at: datetime.datetime | None = None

    @property
    def change_key(self) -> tuple[str, int, str]:
        return (self.state, self.percentage, self.label)

    def running_for(self, now: datetime.datetime) -> str:
        if self.started_at is None:
            return ""
        return duration(now - self.started_at)

    def silence(self, now: datetime.datetime) -> str:
        """``no heartbeat for 1:05`` for a started job whose worker missed two heartbeats (it
        may be gone: the sweep fails it after HEARTBEAT_TIMEOUT); empty otherwise."""
        last_sign = self.last_beat_at or self.started_at
        if self.state != "started" or last_sign is None:
            return ""
        silent = now - last_sign
        if silent.total_seconds() <= 2 * ferry_settings.HEARTBEAT_INTERVAL:
            return ""
        return f"no heartbeat for {duration(silent)}"

    def plain(self, now: datetime.datetime) -> str:
        parts = [f"#{self.id}", self.type, self.owner, self.state, f"{self.percentage}%"]
        if self.label:
            parts.append(self.label)
        if self.started_at is not None and self.state == "started":
            parts.append(f"({self.running_for(now)})")
        if silence := self.silence(now):
            parts.append(f"[{silence}]")
        return " ".join(parts)

    def bar(self, now: datetime.datetime, width: int) -> str:
        head = f"#{self.id:<7} {self.type[:14]:14} {self.owner[:10]:10} {self.state:9}"
        tail = f" {self.percentage:3d}% {self.running_for(now):>7}"
        # Leave 20 columns for the label; the bar gets 10 to 30 of the rest.
        bar_width = max(10, min(30, width - len(head) - len(tail) - 24))
        filled = round(bar_width * self.percentage / 100)
        line = f"{head} [{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
        if silence := self.silence(now):
            line = f"{line}  [{silence}]"
        if self.label:
            line = f"{line}  {self.label}"
        return line if len(line) < width else line[: width - 2] + "…"


def job_lines(jobs: Iterable[Job], snapshots: dict[int, dict[str, Any]]) -> list[JobLine]:
    """Lines for ``jobs``, with progress from ``snapshots`` (the progress store's) where there is
    one, from the database otherwise."""
    lines = []
    for job in jobs:
        snapshot = snapshot_of(job, snapshots.get(job.pk)) or {}
        # The database row is authoritative once a job has ended.
        state = job.state if job.is_ended else snapshot.get("state", job.state)
        lines.append(
            JobLine(
                id=job.pk,
                type=job.type,
                owner=job.user.get_username() if job.user is not None else "(system)",
                state=str(state),
                percentage=int(snapshot.get("progress_percentage", job.progress_percentage)),
                label=str(snapshot.get("progress_state", job.progress_state) or ""),
                started_at=job.started_at,
                last_beat_at=getattr(job, "last_beat_at", None),
            )
        )
    return lines


def duration(delta: datetime.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def check_type_name(name: str) -> None:
    """A ``CommandError`` for a name that is neither a registered type nor that of any job (a
    type removed from the code still has its jobs): a misspelt ``--type`` would otherwise show
    "No pending or running jobs." as if that were so."""
    if job_type_registry.unknown_names([name], Job.objects.all()):
        raise CommandError(
            f"--type: {JobTypeDoesNotExist(name, job_type_registry.names()).summary}"
        )


def sweep_warning() -> str | None:
    """W007 as one line where jobs the stale-job sweep should have failed long ago are still
    live (nothing runs the sweep); None otherwise. Not per ``--type``: the sweep is one for all."""
    warning = unswept_jobs_warning()
    return None if warning is None else f"{warning.id}: {warning.msg} {warning.hint}"


def local_time(now: datetime.datetime) -> datetime.datetime:
    """``now`` in the current time zone; with USE_TZ = False it already is, and naive."""
    return timezone.localtime(now) if timezone.is_aware(now) else now


class Command(OutageReportingCommand):
    help = (
        "Show pending and running jobs with their progress. Progress comes from the progress "
        "store, or from the database when the store has none. With --watch, a terminal shows "
        "live bars; other output gets a line whenever a job changes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--watch", action="store_true", help="Keep updating until Ctrl-C.")
        parser.add_argument(
            "--interval", type=float, default=1.0, help="Seconds between updates (--watch)."
        )
        parser.add_argument(
            "--until-idle",
            action="store_true",
            help="With --watch, stop once no job is pending or running.",
        )
        parser.add_argument("--type", dest="job_type", help="Only jobs of this type.")
        parser.add_argument(
            "--limit",
            type=int,
            default=50,
            help=f"Most jobs shown (oldest first), at most {MAX_LIMIT}.",
        )
        parser.add_argument("--plain", action="store_true", help="Plain lines even on a terminal.")

    def handle(self, *args: Any, **options: Any) -> None:
        check_interval(options["interval"])
        if options["until_idle"] and not options["watch"]:
            raise CommandError(
                "--until-idle stops a --watch: add --watch, or leave --until-idle out to show "
                "the jobs once."
            )
        if not 1 <= options["limit"] <= MAX_LIMIT:
            raise CommandError(f"--limit must be from 1 to {MAX_LIMIT}, got {options['limit']}.")
        self.job_type: str | None = options["job_type"]
        if self.job_type is not None:
            check_type_name(self.job_type)
        self.limit: int = options["limit"]
        self.bars = self.stdout.isatty() and not options["plain"]
        #: Why the progress store could not be read last time; None while it can.
        self.store_error: str | None = None
        if not options["watch"]:
            self.print_frame(self.fetch(), sweep_warning())
            return
        try:
            self.watch(options["interval"], options["until_idle"])
        except KeyboardInterrupt:
            self.stdout.write("")

    def fetch(self) -> list[JobLine]:
        last_beat = Heartbeat.objects.filter(job_id=OuterRef("pk")).values("beat_at")[:1]
        jobs = (
            Job.objects.live()
            .select_related("user")
            .annotate(last_beat_at=Subquery(last_beat))
            .order_by("pk")
        )
        if self.job_type:
            jobs = jobs.filter(type=self.job_type)
        return self.lines(jobs[: self.limit])

    def lines(self, jobs: Iterable[Job]) -> list[JobLine]:
        jobs = list(jobs)
        return job_lines(jobs, self.read_snapshots([job.pk for job in jobs]))

    def read_snapshots(self, job_ids: list[int]) -> dict[int, dict[str, Any]]:
        """The store's snapshots of these jobs; none while it cannot be reached, which is said
        once per outage (on a terminal, in the header of every frame)."""
        try:
            snapshots = get_store().read_many(job_ids)
        except ProgressStoreUnavailable as exc:
            if self.store_error is None and not self.bars:
                self.stderr.write(
                    f"Progress store unavailable, showing progress as the database has it "
                    f"(a running job's is updated when it ends): {exc}"
                )
            self.store_error = str(exc)
            return {}
        if self.store_error is not None and not self.bars:
            self.stderr.write("Progress store reachable again.")
        self.store_error = None
        return snapshots

    def print_frame(self, lines: list[JobLine], warning: str | None = None) -> int:
        """Write every line once, then ``warning``; returns how many terminal lines were
        written."""
        written = self.print_jobs(lines)
        if warning is None:
            return written
        if not self.bars:
            self.stdout.write(self.style.WARNING(warning))
            return written + 1
        # Wrapped here, not by the terminal: the redraw counts the lines.
        width = max(20, shutil.get_terminal_size().columns - 1)
        wrapped = textwrap.wrap(warning, width, break_on_hyphens=False)
        for part in wrapped:
            self.stdout.write(self.style.WARNING(part))
        return written + len(wrapped)

    def print_jobs(self, lines: list[JobLine]) -> int:
        now = timezone.now()
        if not lines:
            self.stdout.write("No pending or running jobs.")
            return 1
        if not self.bars:
            for line in lines:
                self.stdout.write(line.plain(now))
            return len(lines)
        width = shutil.get_terminal_size().columns
        header = f"{len(lines)} pending or running job(s), {local_time(now):%H:%M:%S}"
        if self.store_error is not None:
            header += " (progress store unreachable: progress from the database)"
        # One terminal line, as each bar: the redraw counts them.
        self.stdout.write(header if len(header) < width else header[: width - 2] + "…")
        for line in lines:
            self.stdout.write(line.bar(now, width))
        return len(lines) + 1

    def watch(self, interval: float, until_idle: bool) -> None:
        shown: dict[int, JobLine] = {}
        drawn = 0
        warned = False
        warning: str | None = None
        warning_checked_at: float | None = None
        while True:
            lines = self.fetch()
            if not lines and self.job_type is None:
                # No live job at all, so none the sweep should have failed.
                warning = None
            elif (
                warning_checked_at is None
                or monotonic() - warning_checked_at >= SWEEP_WARNING_INTERVAL
            ):
                warning = sweep_warning()
                warning_checked_at = monotonic()
            if self.bars:
                if drawn:
                    self.stdout.write(REDRAW.format(lines=drawn), ending="")
                drawn = self.print_frame(lines, warning)
            else:
                self.print_changes(shown, lines)
                # Once until it clears: its ages change at every round.
                if warning is not None and not warned:
                    self.stdout.write(self.style.WARNING(warning))
                warned = warning is not None
            shown = {line.id: line for line in lines}
            if until_idle and not lines:
                return
            # Into a pipe or a file, Python holds stdout back until kilobytes pile up.
            self.stdout.flush()
            sleep(interval)

    def print_changes(self, shown: dict[int, JobLine], lines: list[JobLine]) -> None:
        now = timezone.now()
        for line in lines:
            before = shown.get(line.id)
            if before is None or before.change_key != line.change_key:
                self.stdout.write(line.plain(now))
        gone = set(shown) - {line.id for line in lines}
        if gone:
            ended = Job.objects.filter(pk__in=gone).select_related("user").order_by("pk")
            for line in self.lines(ended):
                self.stdout.write(line.plain(now))
