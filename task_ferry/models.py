"""The job tables: one ``Job`` base row per job, plus a row in the job type's own subclass table."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Self, TypeVar

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import models, router
from django.utils import timezone
from django.utils.functional import cached_property

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser


def refuse_without_app() -> None:
    """Raise ``TaskFerryImproperlyConfigured`` with the fix where the job models are imported
    (by a project's job model, or the API's URLconf) and "task_ferry" is not installed. Django's
    own ``RuntimeError`` names the model class and the rule, not the app to add."""
    from django.apps import apps

    from task_ferry.exceptions import TaskFerryImproperlyConfigured

    if apps.apps_ready and not apps.is_installed("task_ferry"):
        raise TaskFerryImproperlyConfigured(
            'task_ferry.models was imported, but "task_ferry" is not in INSTALLED_APPS. '
            'Add "task_ferry" to INSTALLED_APPS (with "rest_framework" for the API) and run '
            "migrate."
        )


refuse_without_app()


class JobState(models.TextChoices):
    PENDING = "pending", "Pending"
    STARTED = "started", "Started"
    FINISHED = "finished", "Finished"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


LIVE_STATES = (JobState.PENDING, JobState.STARTED)
ENDED_STATES = (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)


# The job model a queryset yields: ``Job``, or a job type's own subclass.
JobT = TypeVar("JobT", bound="Job", covariant=True)


class SpecificJobIterable(models.query.ModelIterable):
    """Yields each job as its type's model, from the rows ``JobQuerySet.specific()`` joined."""

    def __iter__(self) -> Any:
        paths = specific_paths()
        for job in super().__iter__():
            yield joined_specific(job, paths)


class JobQuerySet(models.QuerySet[JobT]):
    def specific(self) -> Self:
        """These jobs, each as its type's own model (an ``ExportJob``, say), in the same one
        query: each type's table is joined in. A job whose type is not registered (any more),
        or whose row in its type's table is missing, stays a plain ``Job``."""
        clone = self.select_related(*specific_paths().values())
        clone._iterable_class = SpecificJobIterable
        return clone

    def pending(self) -> Self:
        return self.filter(state=JobState.PENDING)

    def running(self) -> Self:
        return self.filter(state=JobState.STARTED)

    def live(self) -> Self:
        """Jobs that have not ended yet: they count against ``max_count``."""
        return self.filter(state__in=LIVE_STATES)

    def ended(self) -> Self:
        return self.filter(state__in=ENDED_STATES)

    def expired(self, before: datetime.datetime) -> Self:
        return self.ended().filter(finished_at__lt=before)

    def for_user(self, user: AbstractBaseUser | AnonymousUser | None) -> Self:
        """The user's own jobs; ``None`` selects system jobs."""
        if user is None:
            return self.filter(user__isnull=True)
        # An unsaved user's pk is None, which would otherwise select the system jobs.
        if not getattr(user, "is_authenticated", False) or getattr(user, "pk", None) is None:
            return self.none()
        return self.filter(user_id=user.pk)


class Job(models.Model):
    """One background job. Each job type subclasses this model (multi-table inheritance)."""

    content_type = models.ForeignKey(
        ContentType, on_delete=models.PROTECT, related_name="+", editable=False
    )
    type = models.CharField(max_length=100, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="task_ferry_jobs",
        editable=False,
    )
    state = models.CharField(
        max_length=16, choices=JobState.choices, default=JobState.PENDING, editable=False
    )
    progress_percentage = models.PositiveSmallIntegerField(default=0, editable=False)
    progress_state = models.CharField(max_length=255, blank=True, editable=False)
    error = models.TextField(blank=True, editable=False)
    human_readable_error = models.TextField(blank=True, editable=False)
    # Kept for admins and logs only; never sent to API clients.
    traceback = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True, editable=False)
    started_at = models.DateTimeField(null=True, blank=True, editable=False)
    finished_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["user", "-created_at"], name="task_ferry_user_recent"),
            models.Index(fields=["user", "type", "state"], name="task_ferry_user_type_state"),
            models.Index(fields=["state", "finished_at"], name="task_ferry_state_finished"),
        ]

    def __str__(self) -> str:
        return f"{self.type} job #{self.pk} ({self.state})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Saving an existing job writes only its type's own fields. The base columns (state,
        progress, errors, times) belong to ``task_ferry.handler``: a job's code saving a stale
        instance must not revive a job the sweep or a cancel has ended.

        A job created through the ORM rather than ``JobHandler`` (a test's factory, say) gets
        the content type of its model and, unless given one, the type that uses its model; it
        is a pending job that nothing runs until it is dispatched."""
        updating = not self._state.adding and not kwargs.get("force_insert")
        if updating and not args and kwargs.get("update_fields") is None:
            kwargs["update_fields"] = [f.name for f in self.own_fields()]
        if self._state.adding:
            self._fill_in_type()
        super().save(*args, **kwargs)

    def _fill_in_type(self) -> None:
        if not self.type:
            from task_ferry.registry import job_type_registry

            self.type = job_type_registry.get_by_model(type(self)).type
        if self.content_type_id is None:
            self.content_type = ContentType.objects.get_for_model(type(self))

    @classmethod
    def own_fields(cls) -> list[models.Field[Any, Any]]:
        """The columns a job type's model adds to ``Job``, its link to the ``Job`` row left
        out."""
        return [f for f in cls._meta.concrete_fields if f.model is not Job and not f.primary_key]

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def is_ended(self) -> bool:
        return self.state in ENDED_STATES

    @cached_property
    def specific(self) -> Job:
        """This job as an instance of its job type's own model; the plain ``Job`` if its row
        in that model's table is missing (deleted by raw SQL or a migration, not with the
        job): it can still be shown, cancelled, failed and deleted, but not run."""
        model = ContentType.objects.get_for_id(self.content_type_id).model_class()
        if model is None or isinstance(self, model):
            return self
        # The base manager, as Django follows a relation: a default manager that filters rows
        # (soft deletion, say) must not make the job look orphaned. From where this row was
        # read: a job just written is not on a lagging replica yet.
        manager = model._base_manager.db_manager(self._state.db)
        specific: Job | None = manager.filter(pk=self.pk).first()  # type: ignore[assignment]
        return self if specific is None else specific

    def apply_fields(self, fields: dict[str, Any]) -> None:
        """Copy column values written by an ``UPDATE`` onto this instance."""
        for name, value in fields.items():
            setattr(self, name, value)


def specific_paths() -> dict[str, str]:
    """For each registered type, the ``select_related`` path from ``Job`` to its own model."""
    from task_ferry.registry import job_type_registry

    paths: dict[str, str] = {}
    for job_type in job_type_registry:
        steps: list[str] = []
        model: Any = job_type.model_class
        while model is not Job:
            parent = next((p for p in model._meta.parents if issubclass(p, Job)), None)
            if parent is None:
                break
            link = model._meta.parents[parent]
            steps.append(link.remote_field.get_accessor_name())
            model = parent
        if model is Job and steps:
            paths[job_type.type] = "__".join(reversed(steps))
    return paths


def joined_specific(job: Job, paths: dict[str, str]) -> Job:
    """The job as its type's model, from the rows ``select_related(*paths.values())`` joined
    in; the job itself where none was."""
    path = paths.get(job.type)
    if path is None:
        return job
    specific: Any = job
    for step in path.split("__"):
        specific = getattr(specific, step, None)
        if specific is None:
            return job
    result: Job = specific
    return result


def jobs_database() -> str:
    """The database alias job rows are written to: where their transactions and locks are
    taken (``default`` unless a database router says otherwise)."""
    return router.db_for_write(Job)


class Heartbeat(models.Model):
    """Proof of life of a started job, kept apart from the job row so that a job's own open
    transaction (which may lock its row) never delays it. No foreign-key constraint in the
    database: its check would wait on that lock (deleting a job still deletes its heartbeat)."""

    job = models.OneToOneField(Job, primary_key=True, on_delete=models.CASCADE, db_constraint=False)
    worker = models.CharField(max_length=255)
    beat_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"heartbeat of job #{self.job_id} from {self.worker}"


class CancelRequest(models.Model):
    """A cancel request for a running job, recorded while the progress store is unreachable.

    The worker's monitor reads these at each heartbeat. No foreign-key constraint in the
    database: recording a request must never wait on the job's row locks.
    """

    job = models.OneToOneField(
        Job, primary_key=True, on_delete=models.CASCADE, db_constraint=False, related_name="+"
    )
    requested_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"cancel request of job #{self.job_id}"
