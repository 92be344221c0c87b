"""Every exception task_ferry raises on purpose. Catch ``TaskFerryError`` to catch them all."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ImproperlyConfigured


class TaskFerryError(Exception):
    """Base class of task_ferry's own errors."""


class TaskFerryImproperlyConfigured(TaskFerryError, ImproperlyConfigured):
    """A ``TASK_FERRY`` setting, executor or job type is set up wrongly."""


class JobTypeDoesNotExist(TaskFerryError, LookupError):
    """No job type is registered under the requested name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        known_text = ", ".join(repr(k) for k in self.known) or "none are registered"
        #: The unknown name and the known ones, without advice on registering: for API clients.
        self.summary = f"No job type named {name!r}. Known job types: {known_text}."
        super().__init__(
            f"{self.summary} Job types are registered from the job_types module of each app in "
            f"INSTALLED_APPS (<app>/job_types.py), imported at startup."
        )


class JobTypeAlreadyRegistered(TaskFerryImproperlyConfigured):
    """Two different job type classes claim the same ``type`` name."""


class JobDoesNotExist(TaskFerryError, LookupError):
    """No job with this id is visible to this user (it may not exist, or belong to someone else)."""

    def __init__(self, job_id: Any) -> None:
        self.job_id = job_id
        super().__init__(f"No job with id {job_id!r} exists for this user.")


class InvalidJobValues(TaskFerryError, ValueError):
    """The values given to ``create_and_start`` were rejected. No job row was created.

    ``errors`` maps field names to lists of messages, like Django's ``ValidationError``.
    """

    def __init__(self, message: str, errors: dict[str, list[str]] | None = None) -> None:
        self.errors = errors or {}
        super().__init__(message)


class MaxJobCountExceeded(TaskFerryError):
    """The user already has ``max_count`` pending or running jobs of this type."""

    def __init__(self, job_type_name: str, max_count: int) -> None:
        self.job_type_name = job_type_name
        self.max_count = max_count
        super().__init__(
            f"You already have {max_count} unfinished {job_type_name!r} job(s), the limit for "
            f"this type. Wait for one to finish or cancel one, then try again."
        )


class JobCancelled(TaskFerryError):
    """Raised inside a running job at the first progress tick after a cancel request."""


class JobFenced(TaskFerryError):
    """The job was ended elsewhere (cancelled, or failed by the stale-job sweep) while this
    run was still going. The run's database work is rolled back."""


class JobLost(TaskFerryError):
    """Passed to ``on_error`` when the stale-job sweep fails a job: its worker stopped beating,
    or no worker picked it up in time. Nothing of the run was committed."""


class DispatchError(TaskFerryError):
    """The executor could not hand the job to its queue. The job was marked failed, unless the
    database could not be reached either: the message says which."""


class ProgressStoreUnavailable(TaskFerryError):
    """The progress store (Redis or the cache) could not be reached."""


class SnapshotsNotForgotten(ProgressStoreUnavailable):
    """``ProgressStore.delete()`` stopped part-way: the jobs before ``job_ids`` are forgotten,
    these may still be stored (until they expire)."""

    def __init__(self, message: str, job_ids: list[int]) -> None:
        super().__init__(message)
        self.job_ids = job_ids
