"""Every exception task_ferry raises on purpose. Catch ``TaskFerryError`` to catch them all."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ImproperlyConfigured


class TaskFerryError(Exception):
    """Base class of task_ferry's own errors."""


class TaskFerryImproperlyConfigured(TaskFerryError, ImproperlyConfigured):
    """A ``TASK_FERRY`` setting, executor or job type is set up wrongly."""


def listed(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names) or "none are registered"


class JobTypeDoesNotExist(TaskFerryError, LookupError):
    """No job type is registered under the requested name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        known_text = listed(self.known)
        #: The unknown name and the known ones, without advice on registering: for API clients.
        self.summary = f"No job type named {name!r}. Known job types: {known_text}."
        super().__init__(
            f"{self.summary} Job types are registered from the job_types module of each app in "
            f"INSTALLED_APPS (<app>/job_types.py, or the __init__.py of a job_types package), "
            f"imported at startup."
        )


class JobTypeNotRegistered(JobTypeDoesNotExist):
    """A ``JobType`` class given in place of a name is not the class registered under its name."""

    def __init__(
        self, job_type_class: type, known: Iterable[str], registered_class: type | None
    ) -> None:
        name = getattr(job_type_class, "type", "")
        self.name = name if isinstance(name, str) else ""
        self.known = sorted(known)
        path = f"{job_type_class.__module__}.{job_type_class.__qualname__}"
        if registered_class is not None:
            registered_path = f"{registered_class.__module__}.{registered_class.__qualname__}"
            reason = f"its name {self.name!r} is {registered_path}'s"
            advice = (
                f"Give {job_type_class.__name__} a `type` of its own (a subclass inherits "
                f"its parent's), or pass {registered_class.__name__}."
            )
        elif self.name:
            reason = f"nothing is registered under its name {self.name!r}"
            advice = (
                f"Define it in the job_types module of an app in INSTALLED_APPS "
                f"(<app>/job_types.py), imported at startup, or register it with "
                f"job_type_registry.register({job_type_class.__name__})."
            )
        else:
            reason = "it has no `type` name"
            advice = "Pass a JobType subclass with a `type` name and a `model_class`."
        known_text = listed(self.known)
        self.summary = (
            f"{path} is not a registered job type: {reason}. Known job types: {known_text}."
        )
        # Not the parent's message, which is about a name.
        super(JobTypeDoesNotExist, self).__init__(f"{self.summary} {advice}")


class NoJobTypeForModel(JobTypeDoesNotExist):
    """A job model was given where a job type is meant, and no registered type uses it."""

    def __init__(self, model: type, known: Iterable[str]) -> None:
        self.name = ""
        self.known = sorted(known)
        self.summary = (
            f"No registered job type uses the model {model.__name__}. Known job types: "
            f"{listed(self.known)}."
        )
        # Not the parent's message, which is about a name.
        super(JobTypeDoesNotExist, self).__init__(
            f"{self.summary} Register a JobType whose model_class is {model.__name__}, or name "
            f"the job's type (type=... on a job created through the ORM)."
        )


class MultipleJobTypesForModel(TaskFerryError, LookupError):
    """A job model was given where a job type is meant, and several types use that model."""

    def __init__(self, model: type, names: Iterable[str]) -> None:
        self.model = model
        self.names = sorted(names)
        super().__init__(
            f"Several job types use the model {model.__name__}: {listed(self.names)}. Name the "
            f"type (job_type_registry.get(name), or type=... on a job created through the ORM), "
            f"or pass a job whose type is set."
        )


class JobTypeAlreadyRegistered(TaskFerryImproperlyConfigured):
    """Two different job type classes claim the same ``type`` name."""


class JobDoesNotExist(TaskFerryError, LookupError):
    """No job with this id is visible to this user (it may not exist, or belong to someone else)."""

    def __init__(self, job_id: Any) -> None:
        self.job_id = job_id
        super().__init__(f"No job with id {job_id!r} exists for this user.")


class InvalidJobId(JobDoesNotExist):
    """``JobHandler.run_job`` was given something that is not a job id (a positive whole
    number): the message that asked for the run was malformed or forged. Nothing was run."""

    def __init__(self, job_id: Any) -> None:
        self.job_id = job_id
        super(JobDoesNotExist, self).__init__(
            f"Cannot run job {job_id!r}: a job id is a positive whole number, so no job has "
            f"it. The message that asked for this run was malformed or forged; nothing was run."
        )


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


class JobTimeLimitExceeded(JobCancelled):
    """Raised inside a running job at the first progress tick after it ran longer than its
    type's ``time_limit``. A ``JobCancelled``, so code that cleans up on a cancel does so here
    too; the job ends ``failed``, not ``cancelled``."""

    human_readable_error = "This job took longer than it is allowed to and was stopped."

    def __init__(self, time_limit: float) -> None:
        self.time_limit = time_limit
        super().__init__(f"The job ran longer than its time limit of {time_limit:g} s.")


class JobFenced(TaskFerryError):
    """The job was ended elsewhere (cancelled, or failed by the stale-job sweep) while this
    run was still going. The run's database work is rolled back."""


class JobLost(TaskFerryError):
    """Passed to ``on_error`` when the stale-job sweep fails a job: its worker stopped beating,
    or no worker picked it up in time. Nothing of the run was committed."""


class JobRowMissing(TaskFerryError, LookupError):
    """A worker took a job whose row in its type's own table is missing (deleted without the
    job, by SQL or a migration): its own fields are gone, so it was failed instead of run."""


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
