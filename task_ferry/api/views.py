"""The job endpoints: list, create, detail, cancel. The event stream is in ``events.py``."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.db import transaction
from django.dispatch import receiver
from django.utils.datastructures import MultiValueDict
from django.utils.functional import cached_property
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ParseError, ValidationError
from rest_framework.fields import Field, JSONField, ListField, MultipleChoiceField
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import BasePermission
from rest_framework.relations import ManyRelatedField
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from task_ferry import signals
from task_ferry.api.pagination import JobPagination
from task_ferry.api.permissions import IsJobOwner, get_permission_class
from task_ferry.api.serializers import (
    JobSerializer,
    prefetch_type_fields,
    public_job,
    type_serializer_class,
)
from task_ferry.exceptions import (
    InvalidJobValues,
    JobDoesNotExist,
    JobTypeDoesNotExist,
    MaxJobCountExceeded,
    ProgressStoreUnavailable,
)
from task_ferry.handler import JobHandler, forget_snapshots, job_row_exists, parse_job_id
from task_ferry.models import (
    ENDED_STATES,
    LIVE_STATES,
    Job,
    JobQuerySet,
    JobState,
    jobs_database,
    specific_paths,
)
from task_ferry.registry import JobType, job_type_registry
from task_ferry.snapshot import LONE_SURROGATE, job_snapshot, snapshot_of
from task_ferry.stores.base import get_store

__all__ = ["JobViewSet"]

logger = logging.getLogger("task_ferry")

STATE_GROUPS: dict[str, tuple[str, ...]] = {
    "live": tuple(str(s) for s in LIVE_STATES),
    "ended": tuple(str(s) for s in ENDED_STATES),
    **{str(s): (str(s),) for s in JobState},
}
# Fields that read every value of a repeated form key, as DRF's own ``get_value`` does.
LIST_FIELDS = (ListField, MultipleChoiceField, ManyRelatedField)
# Parameter names of create_and_start itself, which job values cannot use.
RESERVED_VALUE_NAMES = frozenset({"cls", "user", "job_type_name"})

_created_jobs: ContextVar[list[Job] | None] = ContextVar("task_ferry_created_jobs", default=None)


@receiver(signals.job_created)
def _remember_created_job(sender: Any, job: Job, **kwargs: Any) -> None:
    created = _created_jobs.get()
    if created is not None:
        created.append(job)


@contextmanager
def capture_created_jobs() -> Iterator[list[Job]]:
    """Collect the jobs created in this context, to answer with a job whose run raised."""
    created: list[Job] = []
    token = _created_jobs.set(created)
    try:
        yield created
    finally:
        _created_jobs.reset(token)


def columns(job_type: JobType) -> set[str]:
    """Names (and attnames) of every column of the type's model, ``Job``'s included, and of its
    many-to-many fields: the values only its serializer may set."""
    meta = job_type.model_class._meta
    return {name for f in meta.concrete_fields for name in (f.name, f.attname)} | {
        f.name for f in meta.many_to_many
    }


def query_values(request: Request, name: str) -> list[str]:
    """Values of a repeatable, comma-separable query parameter."""
    values = [v.strip() for raw in request.query_params.getlist(name) for v in raw.split(",")]
    return [v for v in values if v]


def unknown_choices(name: str, unknown: list[str], allowed: Iterable[str]) -> ValidationError:
    """The 400 for values of query parameter ``name`` that are none of ``allowed``."""
    return ValidationError(
        {
            name: [
                f"Unknown {name} {', '.join(repr(v) for v in unknown)}. "
                f"Choose from: {', '.join(sorted(allowed))}."
            ]
        }
    )


def parse_choices(request: Request, name: str, allowed: Mapping[str, Any]) -> list[str]:
    """Values of a repeatable, comma-separable query parameter; 400 for an unknown one."""
    values = query_values(request, name)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise unknown_choices(name, unknown, allowed)
    return values


def parse_types(request: Request, queryset: JobQuerySet[Job]) -> list[str]:
    """The ``type`` filter's names: registered types, and removed types of which ``queryset``
    (the caller's jobs) still has jobs, so a client that filtered by a type before it was
    removed still gets those jobs. 400 for any other name (a typo), listing the registered
    types."""
    names = query_values(request, "type")
    unknown = job_type_registry.unknown_names(names, queryset)
    if unknown:
        raise unknown_choices("type", unknown, job_type_registry.names())
    return names


class FormJSON(str):
    """A form's text for a ``JSONField``, marked as DRF marks the form values it reads itself,
    so that its ``JSONField`` parses it as JSON."""

    is_json_string = True


def form_value(data: MultiValueDict[str, Any], key: str, field: Field | None) -> Any:
    if isinstance(field, LIST_FIELDS):
        return data.getlist(key)
    value = data[key]
    if isinstance(field, JSONField) and isinstance(value, str):
        return FormJSON(value)
    return value


def form_values(data: MultiValueDict[str, Any], fields: Mapping[str, Field]) -> dict[str, Any]:
    """The values of a form or multipart body (``type`` left out), read as DRF reads a form:
    every value of a key whose field takes a list (``tags=a&tags=b``), the text of a
    ``JSONField`` parsed as JSON (a form has no other way to send an object), else a key's
    last value. A plain dict, not the form itself, keeps the serializer's defaults for what
    the form leaves out (DRF takes a missing boolean in a form for false)."""
    return {key: form_value(data, key, fields.get(key)) for key in data if key != "type"}


def creatable(policy: IsJobOwner, request: Request, job_type: JobType) -> bool:
    """Whether the caller may start ``job_type`` through the API: the type opts in with
    ``api_create``, and the permission class's ``can_create`` agrees."""
    return job_type.api_create and policy.can_create(request, job_type)


def log_refused_type(policy: IsJobOwner, request: Request, name: Any) -> None:
    """Tell the server's log why ``POST /`` refused a type that is registered: its client is
    told no more than for a name no type has."""
    job_type = next((t for t in job_type_registry if t.type == name), None)
    if job_type is None:
        return
    path = f"{type(job_type).__module__}.{type(job_type).__qualname__}"
    if not job_type.api_create:
        # A WARNING: Python's last-resort handler shows it where no logging is set up.
        logger.warning(
            "%s %s: job type %r exists but does not set api_create = True, so API clients "
            "cannot start it (they are told no such type can be started). Set "
            "api_create = True on %s to open it to them.",
            request.method,
            request.path,
            job_type.type,
            path,
        )
    else:
        # The project's permission class chose to: no mistake to warn about.
        logger.info(
            "%s %s: job type %r sets api_create = True, but %s.can_create refused it to user %s.",
            request.method,
            request.path,
            job_type.type,
            type(policy).__qualname__,
            getattr(request.user, "pk", None),
        )


class JSONFirstNegotiation(DefaultContentNegotiation):
    """DRF's negotiation, minus its parsing for the usual poll (no ``Accept``, or JSON): polls
    are the hot path, and the browsable API still answers browsers."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        accept = request.META.get("HTTP_ACCEPT", "*/*")
        renderers = list(renderers)
        first = renderers[0]
        if (
            accept in ("*/*", "application/json")
            and format_suffix is None
            and self.settings.URL_FORMAT_OVERRIDE not in request.query_params
            and first.media_type == "application/json"
        ):
            return first, first.media_type
        return super().select_renderer(request, renderers, format_suffix)


class JobViewSet(viewsets.GenericViewSet[Job]):
    """The caller's jobs: list, create, detail (live from the progress store) and cancel.
    Each action takes the other arguments of the URL it is mounted under (a ``version``) and
    leaves them to DRF."""

    serializer_class = JobSerializer
    pagination_class = JobPagination
    content_negotiation_class = JSONFirstNegotiation
    lookup_value_regex = "[^/]+"

    def get_permissions(self) -> list[BasePermission]:
        return [get_permission_class()()]

    @cached_property
    def policy(self) -> IsJobOwner:
        permission = self.get_permissions()[0]
        assert isinstance(permission, IsJobOwner)
        return permission

    def get_queryset(self) -> JobQuerySet[Job]:
        queryset: JobQuerySet[Job] = Job.objects.order_by("-created_at", "-id")
        return self.policy.visible_jobs(self.request, queryset)

    def filter_queryset(self, queryset: Any) -> Any:
        states = parse_choices(self.request, "state", STATE_GROUPS)
        # Whether a removed type's name is known must not depend on the states asked for.
        types = parse_types(self.request, queryset)
        if states:
            queryset = queryset.filter(state__in={s for g in states for s in STATE_GROUPS[g]})
        if types:
            queryset = queryset.filter(type__in=types)
        return queryset

    def list(self, request: Request, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()).specific())
        jobs: list[Job] = list(page or [])
        prefetch_type_fields(jobs)
        live_ids = [job.pk for job in jobs if job.is_live]
        try:
            live = get_store().read_many(live_ids) if live_ids else {}
        except ProgressStoreUnavailable:
            live = {}
        results = []
        for job in jobs:
            snapshot = job_snapshot(job)
            snapshot.update(snapshot_of(job, live.get(job.pk)) or {})
            results.append(public_job(snapshot))
        return self.get_paginated_response(results)

    def retrieve(self, request: Request, pk: str | None = None, **kwargs: Any) -> Response:
        snapshot = visible_snapshot(self.policy, request, self._parse_id(pk), pk)
        return Response(public_job(snapshot))

    def create(self, request: Request, **kwargs: Any) -> Response:
        try:
            data = request.data
        except RecursionError:
            # Python's JSON parser recurses once per level: a body of "[[[[..." past its limit
            # is a client's error, not a server one.
            raise ParseError("JSON parse error - nested too deeply.") from None
        # Django answers these with its HTML error page, which an API client cannot read.
        except RequestDataTooBig:
            raise ParseError(
                "The request body is larger than this server takes "
                f"({settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes)."
            ) from None
        except TooManyFieldsSent:
            raise ParseError(
                "The form has more fields than this server takes "
                f"({settings.DATA_UPLOAD_MAX_NUMBER_FIELDS})."
            ) from None
        if not isinstance(data, Mapping):
            raise ValidationError(
                {"non_field_errors": ['Send a JSON object: {"type": ..., ...values}.']}
            )
        # An error naming such a key could not be rendered as UTF-8: the client would get a 500.
        unencodable = [key for key in data if LONE_SURROGATE.search(str(key))]
        if unencodable:
            raise ValidationError(
                {
                    "non_field_errors": [
                        f"Field name {key!r} has a lone surrogate, which is not text. "
                        "Send field names as valid Unicode."
                        for key in unencodable
                    ]
                }
            )
        job_type = self._job_type(data.get("type"))
        serializer_class = type_serializer_class(job_type)
        context = self.get_serializer_context()
        if isinstance(data, MultiValueDict):
            values = form_values(data, serializer_class(context=context).fields)
        else:
            values = {key: data[key] for key in data if key != "type"}
        reserved = sorted(RESERVED_VALUE_NAMES & set(values))
        if reserved:
            raise ValidationError({name: ["Unknown field."] for name in reserved})
        serializer = serializer_class(data=values, context=context)
        # DRF drops a value sent for a read-only field without a word: the client would think
        # it had set it.
        read_only = sorted(
            key for key in values if key in serializer.fields and serializer.fields[key].read_only
        )
        if read_only:
            raise ValidationError({name: ["This field is read-only."] for name in read_only})
        serializer.is_valid(raise_exception=True)
        extras = {key: value for key, value in values.items() if key not in serializer.fields}
        # A name the serializer already fills from another field (its ``source``), or a column
        # (or many-to-many field) it leaves out: only the serializer's fields set them.
        clashing = sorted(extras.keys() & (serializer.validated_data.keys() | columns(job_type)))
        if clashing:
            raise ValidationError({name: ["Unknown field."] for name in clashing})
        with capture_created_jobs() as created:
            try:
                job = JobHandler.create_and_start(
                    request.user, job_type.type, **serializer.validated_data, **extras
                )
            except InvalidJobValues as exc:
                raise ValidationError(exc.errors or {"non_field_errors": [str(exc)]}) from exc
            except MaxJobCountExceeded as exc:
                return Response(
                    {
                        "detail": str(exc),
                        "code": "max_job_count_exceeded",
                        "type": exc.job_type_name,
                        "max_count": exc.max_count,
                    },
                    status=status.HTTP_429_TOO_MANY_REQUESTS,
                )
            except Exception:
                # An executor that runs the job inline re-raises its error; the job is saved
                # and marked failed, which is what the client should see.
                if not created:
                    raise
                job = created[0]
        return Response(public_job(newest_snapshot(job)), status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None, **kwargs: Any) -> Response:
        job = self._get_job(self._parse_id(pk), pk)
        if not self.policy.can_cancel(request, job):
            raise NotFound(str(JobDoesNotExist(pk)))
        try:
            job = JobHandler.cancel_job(job)
        except JobDoesNotExist as exc:
            # Deleted since it was read (a clean-up, another request).
            raise NotFound(str(JobDoesNotExist(pk))) from exc
        # A running job is only asked to stop: until it does, its progress is in the store.
        return Response(public_job(newest_snapshot(job) if job.is_live else job_snapshot(job)))

    def _job_type(self, name: Any) -> JobType:
        if name is None or name == "":
            raise ValidationError({"type": ["This field is required."]})
        allowed = [t for t in job_type_registry if creatable(self.policy, self.request, t)]
        for job_type in allowed:
            if job_type.type == name:
                return job_type
        log_refused_type(self.policy, self.request, name)
        # The same whether or not a type of that name exists: the types a client may not start
        # are the project's own business. The log says which it was.
        if allowed:
            known = JobTypeDoesNotExist(str(name), [t.type for t in allowed]).summary
            message = f"{known} Job types opt in to this API with api_create = True."
        else:
            message = (
                f"No job type named {name!r} can be started through this API: job types opt "
                "in with api_create = True."
            )
        raise ValidationError({"type": [message]})

    @staticmethod
    def _parse_id(pk: Any) -> int:
        try:
            return parse_job_id(pk)
        except JobDoesNotExist as exc:
            raise NotFound(str(exc)) from exc

    def _get_job(self, job_id: int, pk: Any) -> Job:
        return visible_job(self.policy, self.request, job_id, pk)


def visible_job(policy: IsJobOwner, request: Request, job_id: int, pk: Any) -> Job:
    """The job as its type's model if ``policy`` lets the user see it, in one query; else 404."""
    queryset = policy.visible_jobs(request, Job.objects.all())
    job = queryset.specific().filter(pk=job_id).first()
    if job is None or not policy.can_view(request, job.user_id):
        raise NotFound(str(JobDoesNotExist(pk)))
    if type(job) is Job and job.type in specific_paths():
        # Its type's row was not joined in (its table on another database, say): looked up.
        return job.specific
    return job


def newest_snapshot(job: Job) -> dict[str, Any]:
    """The store's snapshot of ``job`` if complete (a run may have changed the job since this
    instance was loaded), else the instance's own."""
    try:
        snapshot = snapshot_of(job, get_store().read(job.pk))
    except ProgressStoreUnavailable:
        snapshot = None
    if snapshot is not None and "fields" in snapshot:
        return snapshot
    return job_snapshot(job)


def visible_snapshot(policy: IsJobOwner, request: Request, job_id: int, pk: Any) -> dict[str, Any]:
    """The job's snapshot, from the progress store when it has a complete one (no job query),
    else built from the row; 404 if ``policy`` hides the job from the user."""
    store_reachable = True
    try:
        stored = get_store().read(job_id)
    except ProgressStoreUnavailable:
        stored, store_reachable = None, False
    # A snapshot without the type's fields predates them: the row is complete.
    if stored is not None and "fields" in stored:
        if not policy.can_view(request, stored.get("user_id")) or not policy.lists_job(
            request, job_id
        ):
            raise NotFound(str(JobDoesNotExist(pk)))
        return stored
    job = visible_job(policy, request, job_id, pk)
    snapshot = job_snapshot(job)
    if snapshot_of(job, stored) is None:
        stored = None  # None, or an earlier job's with the same id.
    if job.is_live and stored is not None:
        # Without fields (its type's serializer failed), the stored snapshot still has the
        # progress, which the row does not have until the job ends.
        snapshot.update(stored)
    # A pending job has none until its first poll: store it, so the next polls need no query.
    # Not for an ended job (its snapshot is written when it ends; one that expired is not worth
    # storing again), not when the store holds an older one (it would refuse), and not when the
    # read failed (a frozen store would make the poll wait for it twice).
    if job.is_live and stored is None and store_reachable:
        try:
            written = get_store().write_if_absent(job_id, snapshot)
        except ProgressStoreUnavailable:
            return snapshot
        # Not written: the snapshot there is another poll's, which checks the row itself, or
        # the run's, whose monitor forgets a job deleted while it runs.
        if not written:
            return snapshot
        # A delete committed since the row was read had the store forget the job before this
        # write, which would show the job for PROGRESS_CACHE_TIMEOUT.
        if forget_if_deleted(job_id):
            raise NotFound(str(JobDoesNotExist(pk)))
        check_row_again_on_commit(job_id)
    return snapshot


def check_row_again_on_commit(job_id: int) -> None:
    """In a transaction (``ATOMIC_REQUESTS``), read whether the job's row is there once more
    when it commits: at REPEATABLE READ (MySQL, PostgreSQL) or on SQLite in WAL mode, every read
    of the transaction sees the database as at its first, not a delete committed since."""
    using = jobs_database()
    if transaction.get_connection(using).in_atomic_block:
        # Robust: the request's work is committed by then, and its answer must not be a 500.
        transaction.on_commit(
            functools.partial(forget_if_deleted, job_id), using=using, robust=True
        )


def forget_if_deleted(job_id: int) -> bool:
    """Take the job's snapshot out of the store if its row is gone; whether it was."""
    if job_row_exists(job_id):
        return False
    forget_snapshots([job_id])
    return True
