"""What the API sends and accepts: the job object built from a snapshot, and each job type's
serializer of its own fields.

Every response is built from a snapshot (``task_ferry.snapshot.job_snapshot``), whether it was
read from the progress store or built from a row, so both paths give the same JSON.
"""

from __future__ import annotations

import datetime
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.db import models
from django.db.models import prefetch_related_objects
from django.utils import timezone
from rest_framework import serializers
from rest_framework.utils import encoders

from task_ferry.models import Job, JobState
from task_ferry.registry import JobType, job_type_registry
from task_ferry.snapshot import PUBLIC_FIELDS, isoformat

__all__ = [
    "JobSerializer",
    "prefetch_type_fields",
    "public_job",
    "type_fields",
    "type_serializer_class",
]

FINAL_STATES = frozenset(str(s) for s in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED))

# A file-system path of two or more components (POSIX or Windows), as found in exception text.
PATH_PATTERN = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.~$@+-]+){2,}[\\/]?")
TRACEBACK_MARKER = "Traceback (most recent call last)"
ERROR_MAX_LENGTH = 500
# Values that ``json`` writes as they are; the type's fields need converting otherwise.
JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


class JobSerializer(serializers.Serializer[Any]):
    """The keys every job object has, whatever its type (for the schema; responses are built
    by ``public_job``)."""

    id = serializers.IntegerField(read_only=True)
    type = serializers.CharField(read_only=True)
    state = serializers.ChoiceField(choices=JobState.choices, read_only=True)
    progress_percentage = serializers.IntegerField(read_only=True, min_value=0, max_value=100)
    progress_state = serializers.CharField(read_only=True, allow_blank=True)
    error = serializers.CharField(
        read_only=True,
        allow_blank=True,
        help_text="Short technical reason of a failure; never a traceback or a file path.",
    )
    human_readable_error = serializers.CharField(read_only=True, allow_blank=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)
    started_at = serializers.DateTimeField(read_only=True, allow_null=True)
    finished_at = serializers.DateTimeField(read_only=True, allow_null=True)
    eta = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="Estimated finish time; null unless started with 1 to 99 percent done.",
    )


def own_many_to_many(model: type[Job]) -> list[models.ManyToManyField[Any, Any]]:
    """The many-to-many fields the job type's model adds to ``Job``."""
    return [f for f in model._meta.many_to_many if f.model is not Job]


def own_field_names(model: type[Job]) -> list[str]:
    """Fields the job type's model adds to ``Job``, its many-to-many ones included, in the
    order the model declares them (as a ``ModelForm`` lists them); parent links left out."""
    fields = [*model.own_fields(), *own_many_to_many(model)]
    return [f.name for f in sorted(fields, key=lambda f: f.creation_counter)]


_derived: dict[type[Job], type[serializers.ModelSerializer[Any]]] = {}


def type_serializer_class(job_type: JobType) -> type[serializers.Serializer[Any]]:
    """``job_type.serializer_class``, or a ``ModelSerializer`` of its model's own fields."""
    if job_type.serializer_class is not None:
        return job_type.serializer_class
    model: type[Job] = job_type.model_class
    if model not in _derived:
        meta = type("Meta", (), {"model": model, "fields": own_field_names(model)})
        _derived[model] = type(
            f"{model.__name__}FieldsSerializer", (serializers.ModelSerializer,), {"Meta": meta}
        )
    return _derived[model]


_representers: dict[type[serializers.Serializer[Any]], serializers.Serializer[Any]] = {}


def representer_of(job_type: JobType) -> serializers.Serializer[Any]:
    """The instance of the type's serializer that renders its jobs' fields."""
    serializer_class = type_serializer_class(job_type)
    # One serializer instance per class: building its fields is the expensive part.
    representer = _representers.get(serializer_class)
    if representer is None:
        representer = _representers.setdefault(serializer_class, serializer_class())
    return representer


def shown_many_to_many(job_type: JobType) -> list[str]:
    """The many-to-many fields of the type's model that its serializer reads to render a job."""
    names = [f.name for f in own_many_to_many(job_type.model_class)]
    shown = {
        field.source_attrs[0]
        for field in representer_of(job_type).fields.values()
        if not field.write_only and field.source_attrs
    }
    return [name for name in names if name in shown]


def prefetch_type_fields(jobs: Iterable[Job]) -> None:
    """Read the rows linked to ``jobs`` through the many-to-many fields their types'
    serializers show, one query per field and type, so that ``type_fields`` of each job makes
    none (it would make one per job and field)."""
    by_type: dict[JobType, list[Job]] = defaultdict(list)
    for job in jobs:
        try:
            job_type = job_type_registry.get(job.type)
        except LookupError:
            continue
        if isinstance(job, job_type.model_class):
            by_type[job_type].append(job)
    for job_type, of_type in by_type.items():
        try:
            names = shown_many_to_many(job_type)
        except Exception:
            continue  # A broken serializer: ``type_fields`` logs it for each job.
        if names:
            prefetch_related_objects(of_type, *names)


def type_fields(job: Job) -> dict[str, Any] | None:
    """The job type's own fields of ``job``, JSON-ready; None when ``job`` is not an instance of
    its type's model (a plain ``Job`` row) or its type is not registered."""
    try:
        job_type = job_type_registry.get(job.type)
    except LookupError:
        return None
    if not isinstance(job, job_type.model_class):
        return None
    data = representer_of(job_type).to_representation(job)
    fields = {key: value for key, value in data.items() if key not in PUBLIC_FIELDS}
    if any(value.__class__ not in JSON_SCALARS for value in fields.values()):
        # What DRF's renderer encodes but ``json`` does not (a ``Decimal`` left uncoerced, a
        # method field's ``datetime``): as the API renders it, so stores can write it.
        fields = json.loads(json.dumps(fields, cls=encoders.JSONEncoder))
    return fields


def clean_error(error: str) -> str:
    """The first line of an error, with paths replaced: no traceback, no server layout."""
    if not error:
        return error
    if TRACEBACK_MARKER in error:
        error = error.split(TRACEBACK_MARKER, 1)[0].strip() or "Error"
    line = error.strip().splitlines()[0] if error.strip() else ""
    line = PATH_PATTERN.sub("…", line)
    if len(line) > ERROR_MAX_LENGTH:
        line = line[: ERROR_MAX_LENGTH - 1] + "…"
    return line


def parse_datetime(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def estimate_finish(snapshot: dict[str, Any], now: datetime.datetime | None = None) -> str | None:
    """Extrapolate the finish time from the time since ``started_at`` and the percentage."""
    percentage = snapshot.get("progress_percentage") or 0
    started_at = snapshot.get("started_at")
    if snapshot.get("state") != JobState.STARTED or not started_at or not 0 < percentage < 100:
        return None
    started = parse_datetime(started_at)
    # Naive local times with USE_TZ = False, as the snapshot's started_at then is.
    now = now or timezone.now()
    elapsed = now - started
    if elapsed.total_seconds() < 0:
        return None
    return isoformat(started + elapsed * (100 / percentage))


def public_job(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The job object of the API, from a snapshot: public keys, ETA, then the type's fields."""
    data = {key: snapshot.get(key) for key in PUBLIC_FIELDS}
    data["error"] = clean_error(data["error"] or "")
    data["eta"] = estimate_finish(snapshot)
    fields = snapshot.get("fields")
    if fields:
        for key, value in fields.items():
            data.setdefault(key, value)
    return data


def is_final(snapshot: dict[str, Any]) -> bool:
    return snapshot.get("state") in FINAL_STATES
