"""One read-only admin for every job type.

Nothing here writes a job row: the admin cannot add, change or delete jobs, and its cancel
action goes through ``JobHandler.cancel_job``. A list page costs at most five queries and never
counts a large table: see ``EstimatedCountPaginator``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import display_for_field
from django.contrib.admin.views.main import SEARCH_VAR, ChangeList
from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist
from django.core.paginator import Paginator
from django.db import connections, models
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from task_ferry.exceptions import JobDoesNotExist, ProgressStoreUnavailable
from task_ferry.handler import JobHandler, parse_job_id
from task_ferry.models import Job, JobQuerySet, JobState
from task_ferry.registry import job_type_registry
from task_ferry.snapshot import snapshot_of
from task_ferry.stores.base import get_store

__all__ = ["AgeListFilter", "EstimatedCountPaginator", "JobAdmin", "TypeListFilter"]

# Snapshot from the progress store, attached to live jobs of a list page.
SNAPSHOT_ATTR = "_task_ferry_snapshot"


class EstimatedCountPaginator(Paginator):
    """Counts exactly up to ``exact_count_limit`` rows; beyond that, on PostgreSQL, asks the
    query planner for an estimate instead of counting a million rows."""

    exact_count_limit = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: True when ``count`` is the planner's estimate rather than an exact count.
        self.is_estimate = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return len(queryset)
        # A LIMIT inside the count keeps it cheap however many rows match.
        capped = queryset.order_by()[: self.exact_count_limit + 1].count()
        if capped <= self.exact_count_limit:
            return capped
        estimate = planner_row_estimate(queryset)
        if estimate is None:
            return queryset.count()
        self.is_estimate = True
        return max(estimate, capped)


def planner_row_estimate(queryset: QuerySet[Any]) -> int | None:
    """The planner's row estimate for ``queryset`` on PostgreSQL; None elsewhere."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    sql, params = queryset.order_by().values("pk").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


class JobChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        if any(
            "\x00" in value
            for name, values in request.GET.lists()
            if name != SEARCH_VAR
            for value in values
        ):
            # PostgreSQL refuses a NUL in a query, and the page's count would fail with a
            # server error: refused like any other bad filter, back to the list with "?e=1".
            raise IncorrectLookupParameters("A filter value contains a NUL character.")
        # Tracebacks can be long, and the list never shows them.
        return super().get_queryset(request, exclude_parameters).defer("traceback", "error")

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        self.result_list = list(self.result_list)
        attach_snapshots(self.result_list)


def attach_snapshots(jobs: Sequence[Job]) -> None:
    """Give live jobs their newest snapshot, read in one call to the progress store."""
    live = [job for job in jobs if job.is_live]
    if not live:
        return
    try:
        snapshots = get_store().read_many(job.pk for job in live)
    except ProgressStoreUnavailable:
        return
    for job in live:
        snapshot = snapshot_of(job, snapshots.get(job.pk))
        if snapshot is not None:
            setattr(job, SNAPSHOT_ATTR, snapshot)


def live_value(job: Job, name: str) -> Any:
    """A snapshot value if the progress store has a newer one, else the row's value."""
    snapshot = getattr(job, SNAPSHOT_ATTR, None)
    if snapshot is not None and name in snapshot:
        return snapshot[name]
    return getattr(job, name)


def format_duration(delta: datetime.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{delta.total_seconds():.1f} s" if seconds < 10 else f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


class TypeListFilter(admin.SimpleListFilter):
    """Choices come from the registry, so the filter costs no ``SELECT DISTINCT``."""

    title = "type"
    parameter_name = "type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in job_type_registry.names()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        value = self.value()
        return queryset.filter(type=value) if value else queryset


# Parameter value: (label, age, True for "older than", False for "newer than").
AGE_CHOICES: dict[str, tuple[str, datetime.timedelta, bool]] = {
    "1h": ("Last hour", datetime.timedelta(hours=1), False),
    "24h": ("Last 24 hours", datetime.timedelta(days=1), False),
    "7d": ("Last 7 days", datetime.timedelta(days=7), False),
    "gt7d": ("Older than 7 days", datetime.timedelta(days=7), True),
    "gt30d": ("Older than 30 days", datetime.timedelta(days=30), True),
}


class AgeListFilter(admin.SimpleListFilter):
    """Filters by how long ago the job was created."""

    title = "age"
    parameter_name = "age"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(code, label) for code, (label, _, _) in AGE_CHOICES.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        choice = AGE_CHOICES.get(self.value() or "")
        if choice is None:
            return queryset
        _, age, older = choice
        cutoff = timezone.now() - age
        return (
            queryset.filter(created_at__lt=cutoff)
            if older
            else queryset.filter(created_at__gte=cutoff)
        )


if TYPE_CHECKING:
    JobModelAdmin = admin.ModelAdmin[Job]
else:
    # ModelAdmin is subscriptable only once django-stubs-ext patches it, which core lacks.
    JobModelAdmin = admin.ModelAdmin


def owner_search(term: str) -> Q | None:
    """Users whose username or email (the user model's ``USERNAME_FIELD`` and ``EMAIL_FIELD``,
    where they are text columns) contains ``term``; None if the model has neither."""
    user_model = get_user_model()
    match = None
    for name in dict.fromkeys([user_model.USERNAME_FIELD, user_model.get_email_field_name()]):
        try:
            field = user_model._meta.get_field(name)
        except FieldDoesNotExist:
            continue
        if isinstance(field, models.CharField | models.TextField):
            lookup = Q(**{f"{name}__icontains": term})
            match = lookup if match is None else match | lookup
    return match


@admin.register(Job)
class JobAdmin(JobModelAdmin):
    list_display = ("id", "type", "owner", "state_badge", "progress", "created", "duration")
    list_display_links = ("id", "type")
    list_filter = ("state", TypeListFilter, AgeListFilter)
    list_select_related = ("user",)
    # Declared so the search box shows; get_search_results decides how a term is matched.
    search_fields = ("=id", "=type")
    search_help_text = "A job id, a job type name, or part of an owner's username or email."
    # Newest first along the primary key index: free at any table size.
    ordering = ("-id",)
    sortable_by = ("id", "created")
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    actions = ("cancel_jobs",)
    fieldsets = (
        (None, {"fields": ("id", "type", "owner", "state", "progress", "progress_state")}),
        ("Timing", {"fields": ("created_at", "started_at", "finished_at", "duration")}),
        ("Job type fields", {"fields": ("type_fields",)}),
        ("Error", {"fields": ("human_readable_error", "error", "traceback_display")}),
    )
    readonly_fields = (
        "id",
        "type",
        "owner",
        "state",
        "progress",
        "progress_state",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "type_fields",
        "human_readable_error",
        "error",
        "traceback_display",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # Deleting here would skip before_delete; JobHandler.cleanup_old_jobs deletes jobs.
        return False

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return JobChangeList

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Job | None:
        job = super().get_object(request, object_id, from_field)
        if job is None:
            return None
        attach_snapshots([job])
        return job

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Job], search_term: str
    ) -> tuple[QuerySet[Job], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        with contextlib.suppress(JobDoesNotExist):
            # A job id: one primary key lookup, however large the table.
            return queryset.filter(pk=parse_job_id(term)), False
        match = Q(pk__in=[])
        if owner_match := owner_search(term):
            users = get_user_model()._default_manager.filter(owner_match)
            match |= Q(user__in=users.values("pk"))
        if term in job_type_registry:
            match |= Q(type=term)
        return queryset.filter(match), False

    @admin.display(description="owner")
    def owner(self, job: Job) -> str:
        return str(job.user) if job.user_id else "(system)"

    @admin.display(description="state")
    def state_badge(self, job: Job) -> str:
        return str(JobState(live_value(job, "state")).label)

    @admin.display(description="progress")
    def progress(self, job: Job) -> SafeString:
        percentage = int(live_value(job, "progress_percentage") or 0)
        label = live_value(job, "progress_state") or ""
        return format_html(
            '<progress class="task-ferry-progress" max="100" value="{}" title="{}">{}%</progress>'
            " {}%",
            percentage,
            label,
            percentage,
            percentage,
        )

    @admin.display(description="created", ordering="id")
    def created(self, job: Job) -> datetime.datetime:
        return job.created_at

    @admin.display(description="duration")
    def duration(self, job: Job) -> str:
        if job.started_at is None:
            return "-"
        end = job.finished_at or timezone.now()
        return format_duration(end - job.started_at)

    @admin.display(description="fields")
    def type_fields(self, job: Job) -> SafeString | str:
        specific = job.specific
        own = type(specific).own_fields()
        if not own:
            return "-"
        rows = format_html_join(
            "",
            "<tr><th>{}</th><td>{}</td></tr>",
            (
                (f.verbose_name, display_for_field(f.value_from_object(specific), f, "-"))
                for f in own
            ),
        )
        return format_html("<table>{}</table>", rows)

    @admin.display(description="traceback")
    def traceback_display(self, job: Job) -> SafeString | str:
        if not job.traceback:
            return "-"
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', job.traceback)

    @admin.action(description="Cancel selected jobs", permissions=["cancel"])
    def cancel_jobs(self, request: HttpRequest, queryset: JobQuerySet[Job]) -> None:
        cancelled = asked = 0
        ended = queryset.ended().count()
        for job in queryset.live():
            specific = job.specific
            try:
                JobHandler.cancel_job(specific)
            except ProgressStoreUnavailable as exc:
                self.message_user(
                    request, f"Job {job.pk}: cancel request not delivered: {exc}", messages.ERROR
                )
                continue
            except JobDoesNotExist:
                self.message_user(request, f"Job {job.pk} was deleted meanwhile.", messages.WARNING)
                continue
            if specific.state == JobState.CANCELLED:
                cancelled += 1
            elif specific.is_live:
                asked += 1
            else:
                ended += 1  # It ended meanwhile.
        parts = []
        if cancelled:
            parts.append(f"cancelled {cancelled} pending job(s)")
        if asked:
            parts.append(f"asked {asked} running job(s) to stop at their next progress tick")
        if ended:
            parts.append(f"left {ended} ended job(s) unchanged")
        summary = "; ".join(parts) or "no jobs selected"
        self.message_user(request, summary[0].upper() + summary[1:] + ".")
