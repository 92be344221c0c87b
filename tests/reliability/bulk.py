"""Fast creation of many job rows of several types, for the cleanup test and bench/cleanup.py.

Multi-table job models cannot use ``bulk_create``, so base rows are bulk-created and each type's
own table gets one multi-row insert per batch.
"""

from __future__ import annotations

import datetime
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.utils import timezone

from task_ferry.models import Job, JobState
from task_ferry.registry import job_type_registry

# Several types over three tables; values for columns without a default.
TYPES = ("scripted", "routed", "limited", "export_table")
REQUIRED = {"export_table": {"table_id": 1}}
BATCH = 2000


def bulk_jobs(
    count: int,
    *,
    state: JobState = JobState.FINISHED,
    age: datetime.timedelta = datetime.timedelta(days=30),
    user: Any = None,
    types: tuple[str, ...] = TYPES,
) -> list[int]:
    """Insert ``count`` jobs of ``types`` (round robin) in ``state``, ended ``age`` ago."""
    when = timezone.now() - age
    ended = state in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)
    ids: list[int] = []
    for start in range(0, count, BATCH):
        size = min(BATCH, count - start)
        with transaction.atomic():
            rows = [
                _base_row(types[(start + i) % len(types)], state, when, ended, user)
                for i in range(size)
            ]
            created = Job.objects.bulk_create(rows)
            for type_name in types:
                _insert_own_rows(type_name, [j.pk for j in created if j.type == type_name])
        ids.extend(j.pk for j in created)
    return ids


def _base_row(
    type_name: str, state: JobState, when: datetime.datetime, ended: bool, user: Any
) -> Job:
    model = job_type_registry.get(type_name).model_class
    return Job(
        content_type=ContentType.objects.get_for_model(model),
        type=type_name,
        user=user,
        state=state,
        created_at=when,
        started_at=when if state != JobState.PENDING else None,
        finished_at=when if ended else None,
        progress_percentage=100 if state == JobState.FINISHED else 0,
    )


def _insert_own_rows(type_name: str, pks: list[int]) -> None:
    if not pks:
        return
    model = job_type_registry.get(type_name).model_class
    fields = model._meta.local_concrete_fields
    required = REQUIRED.get(type_name, {})
    values = []
    for field in fields:
        if field.primary_key:
            continue
        default = required.get(field.name, field.get_default())
        values.append(field.get_db_prep_save(default, connection))
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    pk_index = next(i for i, f in enumerate(fields) if f.primary_key)
    rows = []
    for pk in pks:
        row = list(values)
        row.insert(pk_index, pk)
        rows.append(row)
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({columns}) "
            f"VALUES ({placeholders})",
            rows,
        )
