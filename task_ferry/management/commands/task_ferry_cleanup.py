"""Delete ended jobs older than a cutoff, through ``JobHandler.cleanup_old_jobs``."""

from __future__ import annotations

import datetime
import re
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db.models import Count
from django.utils import timezone

from task_ferry.conf import ferry_settings
from task_ferry.handler import JobHandler
from task_ferry.management.databases import OutageReportingCommand
from task_ferry.models import Job

AGE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "": "days"}


# The checks refuse a longer JOB_EXPIRY_DAYS: a cutoff before year 1 cannot be computed.
MAX_AGE = datetime.timedelta(days=36500)


def parse_age(text: str) -> datetime.timedelta:
    """``"12h"``, ``"3d"``, ``"2w"``, ``"90m"``, ``"30s"``, or a bare number of days."""
    match = AGE_PATTERN.match(text)
    if match is None:
        raise CommandError(
            f"--older-than {text!r} is not an age. Use a number with an optional unit: "
            f"30s, 90m, 12h, 3d or 2w (a bare number means days)."
        )
    amount, unit = match.groups()
    try:
        age = datetime.timedelta(**{AGE_UNITS[unit]: float(amount)})
    except OverflowError:
        age = datetime.timedelta.max
    if age > MAX_AGE:
        raise CommandError(f"--older-than {text!r} is too far back: at most 36500 days.")
    return age


class Command(OutageReportingCommand):
    help = (
        "Delete ended jobs (finished, failed or cancelled) that finished longer ago than "
        "--older-than, default TASK_FERRY['JOB_EXPIRY_DAYS'] days. Each job type's "
        "before_delete hook runs first."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=str,
            default=None,
            help="Age of the jobs to delete: 30s, 90m, 12h, 3d, 2w, or a number of days.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Print what would be deleted, delete nothing. With -v 2, list every job.",
        )

    def handle(self, *args: Any, older_than: str | None, dry_run: bool, **options: Any) -> None:
        if older_than is None:
            age = datetime.timedelta(days=ferry_settings.JOB_EXPIRY_DAYS)
        else:
            age = parse_age(older_than)
        cutoff = JobHandler.expiry_cutoff(age)
        when = f"finished before {stamp(cutoff)} (older than {describe(age)})"
        if not dry_run:
            deleted = JobHandler.cleanup_old_jobs(older_than=age)
            self.stdout.write(f"Deleted {deleted} ended job(s) {when}.")
            return
        expired = Job.objects.expired(cutoff)
        per_type: dict[str, dict[str, int]] = {}
        for row in expired.values("type", "state").annotate(n=Count("pk")).order_by():
            per_type.setdefault(row["type"], {})[row["state"]] = row["n"]
        total = sum(n for states in per_type.values() for n in states.values())
        self.stdout.write(f"Would delete {total} ended job(s) {when}.")
        for type_name in sorted(per_type):
            states = per_type[type_name]
            detail = ", ".join(f"{state} {n}" for state, n in sorted(states.items()))
            self.stdout.write(f"  {type_name}: {sum(states.values())} ({detail})")
        if options["verbosity"] >= 2:
            for job_id, type_name, state, finished_at in expired.order_by("pk").values_list(
                "pk", "type", "state", "finished_at"
            ):
                # expired() selects by finished_at: never None here.
                assert finished_at is not None
                self.stdout.write(f"  #{job_id} {type_name} {state} at {stamp(finished_at)}")


def stamp(moment: datetime.datetime) -> str:
    """``moment`` with its zone, not in the locale's format. With USE_TZ = False the database
    holds naive times in TIME_ZONE, so that zone is named."""
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment, timezone.get_default_timezone())
    return f"{moment:%Y-%m-%d %H:%M:%S %Z}"


def describe(age: datetime.timedelta) -> str:
    seconds = age.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"
