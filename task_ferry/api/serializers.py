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

from django.db import connections, models
from django.db.models import prefetch_related_objects
from django.utils import timezone
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.relations import MANY_RELATION_KWARGS
from rest_framework.utils import encoders

from task_ferry.models import Job, JobState
from task_ferry.registry import JobType, job_type_registry
from task_ferry.snapshot import PUBLIC_FIELDS, isoformat

__all__ = [
    "JobSerializer",
    "RelatedKeyField",
    "RelatedKeysField",
    "prefetch_type_fields",
    "public_job",
    "type_fields",
    "type_serializer_class",
]

FINAL_STATES = frozenset(str(s) for s in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED))

# A file-system path of two or more components (POSIX or Windows), as found in exception text.
PATH_PATTERN = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.~$@+-]+){2,}[\\/]?")
# Credentials an exception's text may quote: a URL's password (``scheme://user:secret@host``),
# the value of a key named like a secret (``password=...``, ``?api_key=...``, ``'token': ...``;
# a key before a colon only when quoted, so ``InvalidTokenError: ...`` keeps its message), and
# a bearer token.
URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]{0,30}+://[^\s:/?#]*):[^\s/?#]*@", re.IGNORECASE)
# A key and its value (``key=value``, or ``'key': value`` quoted), keys taken whole without
# backtracking (possessive), so that long text costs each poll of a failed job one pass; which
# keys name a secret, ``SECRET_NAME`` tells.
KEY_VALUE = re.compile(
    r"""(\b([\w.-]{1,60}+)\s*=\s*|(["'])([\w.-]{1,60}+)\3\s*:\s*)"""
    r"""("[^"]*"|'[^']*'|[^\s&,;})\]?=]+)"""
)
SECRET_NAME = re.compile(
    r"passw(?:or)?d|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key", re.IGNORECASE
)
BEARER_TOKEN = re.compile(r"\b(Bearer\s+)[\w.~+/-]+=*", re.IGNORECASE)
TRACEBACK_MARKER = "Traceback (most recent call last)"
ERROR_MAX_LENGTH = 500
# Values that ``json`` writes as they are; the type's fields need converting otherwise.
JSON_SCALARS = frozenset({str, int, float, bool, type(None)})
# An integer key as a form sends it (and as DRF took it in JSON too): ASCII digits only, since
# Python's ``int`` also reads "1_000" and other scripts' digits.
DIGITS = re.compile(r"\s*([+-]?[0-9]+)\s*")
# Longer digit strings are no key of any row; ``int`` would refuse some of them.
MAX_KEY_DIGITS = 30


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
        help_text=(
            "Short technical reason of a failure; never a traceback, a file path or a password."
        ),
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


def key_field(model: type[models.Model]) -> models.Field[Any, Any]:
    """The column that holds ``model``'s primary key values: a parent link's target, followed."""
    field: Any = model._meta.pk
    while field.remote_field is not None:
        field = field.target_field
    result: models.Field[Any, Any] = field
    return result


def shown_value(data: Any) -> str:
    """A scalar as JSON writes it, for an error message (ASCII, and cut short)."""
    text = json.dumps(data)
    return text if len(text) <= 40 else text[:39] + "…"


class RelatedKeyField(serializers.PrimaryKeyRelatedField):
    """DRF's ``PrimaryKeyRelatedField``, refusing what Django would coerce into a key: a float
    (``1.5`` found row 1), a bool, a string of anything but digits for an integer key. With
    ``many=True`` it is a ``RelatedKeysField``, which reads the whole list in one query."""

    default_error_messages = {
        "null_key": "The list may not contain null: send only keys of rows.",
        "incorrect_key": "Incorrect type. Expected {expected}, received {data_type}{value}.",
    }

    @classmethod
    def many_init(cls, *args: Any, **kwargs: Any) -> RelatedKeysField:
        list_kwargs = {key: value for key, value in kwargs.items() if key in MANY_RELATION_KWARGS}
        return RelatedKeysField(child_relation=cls(*args, **kwargs), **list_kwargs)

    def has_integer_keys(self) -> bool:
        queryset = self.get_queryset()
        return queryset is not None and isinstance(key_field(queryset.model), models.IntegerField)

    def to_key(self, data: Any, integer_keys: bool) -> Any:
        """The key ``data`` stands for, or a ``ValidationError`` saying what is wrong with it."""
        if data is None:
            self.fail("null_key")
        if integer_keys:
            if isinstance(data, int) and not isinstance(data, bool):
                return data
            match = DIGITS.fullmatch(data) if isinstance(data, str) else None
            if match:
                digits = match[1]
                return int(digits) if len(digits.lstrip("+-")) <= MAX_KEY_DIGITS else digits
            self.fail_incorrect_key(data, "an integer key")
        if isinstance(data, (bool, float, list, dict)):
            self.fail_incorrect_key(data, "a key of the related rows")
        return data

    def fail_incorrect_key(self, data: Any, expected: str) -> None:
        scalar = isinstance(data, (bool, int, float, str))
        self.fail(
            "incorrect_key",
            expected=expected,
            data_type=type(data).__name__,
            value=f" {shown_value(data)}" if scalar else "",
        )

    def to_internal_value(self, data: Any) -> Any:
        if self.pk_field is not None:
            if data is None:
                self.fail("null_key")
            return super().to_internal_value(data)
        integer_keys = self.has_integer_keys()
        key = self.to_key(data, integer_keys)
        if integer_keys and isinstance(key, str):
            self.fail("does_not_exist", pk_value=data)
        return super().to_internal_value(key)


class RelatedKeysField(serializers.ManyRelatedField):
    """A list of related rows by their keys: with a ``RelatedKeyField`` child of integer keys,
    one query for the whole list, with the errors the child gives item by item (the first bad
    item, in the list's order)."""

    def to_internal_value(self, data: Any) -> list[Any]:
        child = self.child_relation
        bulk = (
            isinstance(child, RelatedKeyField)
            # A subclass that reads one key its own way is asked for each.
            and type(child).to_internal_value is RelatedKeyField.to_internal_value
            and child.pk_field is None
            and child.has_integer_keys()
        )
        if not bulk or isinstance(data, str) or not hasattr(data, "__iter__"):
            return list(super().to_internal_value(data))
        assert isinstance(child, RelatedKeyField)
        items = list(data)
        if not self.allow_empty and not items:
            self.fail("empty")
        keys: list[Any] = []
        refused: ValidationError | None = None
        for item in items:
            try:
                keys.append(child.to_key(item, integer_keys=True))
            except ValidationError as exc:
                refused = exc
                break
        queryset = child.get_queryset()
        assert queryset is not None  # has_integer_keys() said so
        lowest, highest = integer_range(queryset)
        # A key out of the column's range is no row's (SQLite would raise on it).
        wanted = {k for k in keys if isinstance(k, int) and lowest <= k <= highest}
        rows = queryset.in_bulk(list(wanted)) if wanted else {}
        # ``keys`` stops at a refused item: only the keys before it are checked.
        for key, item in zip(keys, items, strict=False):
            if key not in rows:
                child.fail("does_not_exist", pk_value=item)
        if refused is not None:
            raise refused
        return [rows[key] for key in keys]


def integer_range(queryset: models.QuerySet[Any]) -> tuple[int, int]:
    """The values the primary key column of ``queryset``'s model holds, on its database."""
    field = key_field(queryset.model)
    try:
        lowest, highest = connections[queryset.db].ops.integer_field_range(
            field.get_internal_type()
        )
    except KeyError:
        lowest, highest = None, None
    return (
        -(2**63) if lowest is None else lowest,
        2**63 - 1 if highest is None else highest,
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
            f"{model.__name__}FieldsSerializer",
            (serializers.ModelSerializer,),
            {"Meta": meta, "serializer_related_field": RelatedKeyField},
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


def hide_credentials(text: str) -> str:
    """``text`` with the passwords, keys and tokens it quotes replaced by ``***``."""
    text = URL_PASSWORD.sub(r"\1:***@", text)
    text = KEY_VALUE.sub(hidden_if_secret, text)
    return BEARER_TOKEN.sub(r"\1***", text)


def hidden_if_secret(match: re.Match[str]) -> str:
    """A ``KEY_VALUE`` match, its value replaced by ``***`` if its key names a secret."""
    key = match[2] or match[4]
    return f"{match[1]}***" if SECRET_NAME.search(key) else match[0]


def clean_error(error: str) -> str:
    """The first line of an error, with credentials and paths replaced: no traceback, no
    secret, no server layout."""
    if not error:
        return error
    if TRACEBACK_MARKER in error:
        error = error.split(TRACEBACK_MARKER, 1)[0].strip() or "Error"
    line = error.strip().splitlines()[0] if error.strip() else ""
    line = PATH_PATTERN.sub("…", hide_credentials(line))
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
