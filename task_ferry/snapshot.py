"""A job's snapshot: what a poll returns, as one JSON-ready dict, built from a ``Job`` row.

Snapshots are written to the progress store while a job lives, so the API can answer a poll
(and check who may see it, through ``user_id``) without a database query.
"""

from __future__ import annotations

import datetime
import logging
import re
from typing import Any

from task_ferry.models import Job

logger = logging.getLogger("task_ferry")

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
STATE_LABEL_MAX_LENGTH = Job._meta.get_field("progress_state").max_length or 255
# The most of an error text (``error``, ``human_readable_error``) a job row keeps: an exception
# may quote a whole file, and a statement over MariaDB's max_allowed_packet is refused.
ERROR_TEXT_MAX_LENGTH = 2000

# Keys of the public poll response, in the spec's order.
PUBLIC_FIELDS = (
    "id",
    "type",
    "state",
    "progress_percentage",
    "progress_state",
    "error",
    "human_readable_error",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
)


def isoformat(value: datetime.datetime | None) -> str | None:
    """``value`` in ISO 8601, in UTC with a ``Z`` where it is aware: a database that keeps
    local times (``DATABASES[...]["TIME_ZONE"]``) loads it in that zone, and the text must
    match the snapshot's, made from the UTC value of the job just created. Naive values
    (``USE_TZ = False``) as they are."""
    if value is None:
        return None
    if value.utcoffset():
        value = value.astimezone(datetime.UTC)
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def storable(text: str) -> str:
    """``text`` as every database stores it: PostgreSQL refuses NUL characters in text, and no
    driver encodes lone surrogates (``os.fsdecode()`` of a file name that is not UTF-8)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text if text.isascii() else LONE_SURROGATE.sub("\ufffd", text)


def truncate_state(label: object) -> str:
    """The label as it fits the ``progress_state`` column: longer ones are cut, not refused."""
    text = label if isinstance(label, str) else str(label)
    if len(text) > STATE_LABEL_MAX_LENGTH:
        # Cut first: the monitor does this for every job at each interval, whatever the length.
        text = text[: STATE_LABEL_MAX_LENGTH - 1] + "…"
    return storable(text)


def truncate_error(text: str) -> str:
    """An error text as a job row keeps it: longer ones are cut, the cut marked, not refused."""
    if len(text) > ERROR_TEXT_MAX_LENGTH:
        text = text[: ERROR_TEXT_MAX_LENGTH - 1] + "…"
    return storable(text)


def cancel_token(job: Job) -> str:
    """Tells a job from an earlier one with the same id (ids can be reused, e.g. on SQLite), so
    a stale cancel request left in the store never stops a new job."""
    return isoformat(job.created_at) or ""


def snapshot_of(job: Job, stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """``stored`` (read from the store under ``job``'s id) if it is ``job``'s; None if there is
    none, or if an earlier job with that id left it: ids come round again when a database is
    restored from a backup or a test database is created anew, while the store keeps its keys
    for ``PROGRESS_CACHE_TIMEOUT``."""
    if stored is None or stored.get("created_at") != cancel_token(job):
        return None
    return stored


def json_ready_key(value: Any) -> Any:
    """A user's key as a snapshot holds it: a key that JSON has no type for (a ``UUIDField``
    primary key's UUID) as text, which the API's owner check compares as text anyway."""
    return value if value is None or isinstance(value, int | str) else str(value)


def job_snapshot(job: Job) -> dict[str, Any]:
    return {
        "id": job.pk,
        "type": job.type,
        "state": str(job.state),
        "progress_percentage": job.progress_percentage,
        "progress_state": job.progress_state,
        "error": job.error,
        "human_readable_error": job.human_readable_error,
        "created_at": isoformat(job.created_at),
        "updated_at": isoformat(job.updated_at),
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
        "user_id": json_ready_key(job.user_id),
        **_type_fields_entry(job),
    }


def _type_fields_entry(job: Job) -> dict[str, Any]:
    """``{"fields": ...}``: the job type's own fields as the API shows them, so a poll of a live
    job needs no query; empty for a plain ``Job`` instance."""
    from task_ferry.api.serializers import type_fields

    try:
        fields = type_fields(job)
    except Exception:
        # A broken type serializer must not stop progress from being published.
        logger.exception("Job %s: the job type's serializer failed", job.pk)
        return {}
    return {} if fields is None else {"fields": fields}
