"""The hand-written SQL of the statements every job pays for.

- ``insert_job``: a new job's two rows (``Job`` and its type's) in one statement;
- ``insert_jobs``: the rows of many new jobs with one statement per table (and batch of rows);
- ``start_and_load``: the move from pending to started, returning the job's row, in one;
- ``compare_and_set``: every other state change (``handler.transition``).

The ORM would build each query anew on every call, and take four round trips for each of the
first two. Here each statement is built once per model and database and kept. Where the
connection allows prepared statements (PostgreSQL with psycopg 3 and ``prepare_threshold`` set
in the database's ``OPTIONS``), the three statements of every job also go through a cursor that
binds on the server (``statement_cursor``), so psycopg prepares them and PostgreSQL stops
parsing and planning them for each job.
``insert_job`` and ``start_and_load`` run on PostgreSQL in autocommit mode only
(``one_statement_connection``), ``insert_jobs`` on PostgreSQL in a transaction; elsewhere they
write nothing and say so (False, None), and the caller takes the ORM's way.
``compare_and_set`` runs on every backend.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import DatabaseError, DataError, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field
from django.db.models.signals import post_save, pre_save
from django.utils import timezone

from task_ferry.models import Job, JobState, jobs_database

__all__ = [
    "compare_and_set",
    "insert_job",
    "insert_jobs",
    "one_statement_connection",
    "start_and_load",
    "statement_cursor",
]

T = TypeVar("T")

# Built statements by (kind, model or column names, database alias, ...); None for "cannot".
_statements: dict[tuple[Any, ...], Any] = {}


# In a statement's FROM list: its own transaction commits without waiting for the WAL flush.
# set_config(..., true) lasts for that transaction only: nothing to reset.
NO_FLUSH = "SELECT set_config('synchronous_commit', 'off', true)"


def cached(key: tuple[Any, ...], build: Callable[[], T]) -> T:
    """The statement kept under ``key``, built the first time it is asked for."""
    if key not in _statements:
        _statements[key] = build()
    statement: T = _statements[key]
    return statement


def statement_cursor(connection: BaseDatabaseWrapper) -> Any:
    """A cursor for a statement every job runs: Django's, or, where the connection allows
    prepared statements, one that binds parameters on the server so that psycopg can prepare
    the statement.

    Django binds parameters on the client unless ``OPTIONS["server_side_binding"]`` is set, and
    psycopg cannot prepare such a query; Django turns prepared statements off unless
    ``OPTIONS["prepare_threshold"]`` is set, because a pooler in transaction mode (PgBouncer
    before 1.21) hands a session's statements to other sessions. So a project that set
    ``prepare_threshold`` has said prepared statements work on its connections; then these
    statements are prepared after that many runs even where the rest of Django binds on the
    client. The cursor is wrapped as Django wraps its own (execute wrappers, Django's database
    errors). While queries are logged (``DEBUG``, ``CaptureQueriesContext``), Django's own
    cursor: its log reads a query's text from where a client-bound cursor keeps it."""
    if (
        connection.vendor != "postgresql"
        or connection.queries_logged
        or connection.settings_dict["OPTIONS"].get("server_side_binding") is True
    ):
        return connection.cursor()
    # What connection.cursor() does before it makes its cursor.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    raw = connection.connection
    if getattr(raw, "prepare_threshold", None) is None:
        return connection.cursor()
    from django.db.backends.postgresql import base as postgresql

    connection.validate_thread_sharing()
    # Django's psycopg cursor class that binds on the server (django-stubs does not know it).
    server_binding: Any = postgresql.ServerBindingCursor
    with connection.wrap_database_errors:
        return connection.make_cursor(server_binding(raw))


def one_statement_connection(model: type[Job]) -> BaseDatabaseWrapper | None:
    """The connection ``Job`` and ``model`` are both written through, when one statement of
    our own may do the work there: PostgreSQL, outside any ``atomic()`` block (inside one, the
    caller's transaction decides about commits and round trips anyway). A statement that
    loads the job reads it there too, as a replica a router reads from may not have it yet."""
    using = jobs_database()
    if router.db_for_write(model) != using:
        return None
    connection = connections[using]
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return None
    return connection


def compare_and_set(
    job_id: int, from_states: list[str], values: dict[str, Any], *, flush: bool = True
) -> bool:
    """``UPDATE`` the job's row with ``values`` if its state is one of ``from_states``; whether
    it did. The statement ``QuerySet.update()`` sends, built once instead of for every call:
    every job ends through here, so the query building would cost more than the query.
    ``flush=False``: see ``handler.transition``. Text that the job table's character set on
    MySQL cannot hold (``latin1``, ``utf8mb3``: see ``fit_to_columns``) is narrowed to what
    its columns hold, in ``values`` too, so the caller sees what was stored."""
    using = jobs_database()
    connection = connections[using]
    no_flush = not flush and connection.vendor == "postgresql" and not connection.in_atomic_block

    def build() -> tuple[str, list[Field[Any, Any]]]:
        by_name = {f.name: f for f in Job._meta.concrete_fields}
        fields = [by_name[name] for name in values]

        def column(field: Field[Any, Any]) -> str:
            return connection.ops.quote_name(field.get_attname_column()[1] or field.attname)

        assignments = ", ".join(f"{column(f)} = %s" for f in fields)
        states = ", ".join("%s" for _ in from_states)
        source = f"FROM ({NO_FLUSH}) AS no_flush " if no_flush else ""
        sql = (
            f"UPDATE {connection.ops.quote_name(Job._meta.db_table)} SET {assignments} {source}"
            f"WHERE {column(by_name['id'])} = %s AND {column(by_name['state'])} IN ({states})"
        )
        return sql, fields

    sql, fields = cached(
        ("compare_and_set", using, tuple(values), len(from_states), no_flush), build
    )
    params = [f.get_db_prep_save(values[f.name], connection) for f in fields]
    with transaction.mark_for_rollback_on_error(using), statement_cursor(connection) as cursor:
        try:
            cursor.execute(sql, [*params, job_id, *from_states])
        except DatabaseError as exc:
            narrowed = (
                fit_to_columns(cursor, values, fields) if refused_text(connection, exc) else {}
            )
            if not narrowed:
                raise
            # A table in a narrower character set than the text (latin1, utf8mb3): refused, the
            # job's own end (its error, its label) would leave it started. MySQL undoes the
            # statement alone, so the transaction goes on.
            values.update(narrowed)
            params = [f.get_db_prep_save(values[f.name], connection) for f in fields]
            cursor.execute(sql, [*params, job_id, *from_states])
        return bool(cursor.rowcount)


# MySQL's "Incorrect <type> value" (1366): for text, characters its character set lacks.
MYSQL_INCORRECT_STRING_VALUE = 1366
BEYOND_BMP = re.compile("[\U00010000-\U0010ffff]")
# MySQL character sets that hold every character, and those that hold the BMP only.
WHOLE_UNICODE = frozenset({"utf8mb4", "utf16", "utf16le", "utf32"})
BMP_ONLY = frozenset({"utf8mb3", "utf8", "ucs2"})
# For each MySQL character set, a Python codec holding no character it lacks (MySQL's latin1
# is Windows-1252); test_statements.py checks each against the server. The character sets
# left out differ from Python's codecs in places, and are taken as ASCII.
CHARSET_CODECS = {
    "ascii": "ascii",
    "latin1": "cp1252",
    "latin2": "iso8859_2",
    "latin5": "iso8859_9",
    "latin7": "iso8859_13",
    "cp1250": "cp1250",
    "cp1251": "cp1251",
    "cp1257": "cp1257",
    "cp850": "cp850",
    "cp852": "cp852",
    "koi8r": "koi8_r",
    "macroman": "mac_roman",
    "gbk": "gbk",
    "gb2312": "gb2312",
}


def refused_text(connection: BaseDatabaseWrapper, exc: DatabaseError) -> bool:
    """Whether MySQL refused a statement for a value its column cannot hold, text with
    characters missing from the column's character set among them."""
    code = exc.args[0] if exc.args else None
    return connection.vendor == "mysql" and code == MYSQL_INCORRECT_STRING_VALUE


def fit_to_charset(text: str, charset: str) -> str:
    """``text`` with each character MySQL's ``charset`` lacks replaced: by U+FFFD where the
    character set holds it (``utf8mb3``), else by ``?``."""
    if charset in WHOLE_UNICODE or text.isascii():
        return text
    if charset in BMP_ONLY:
        return BEYOND_BMP.sub("\ufffd", text)
    # None of these codecs holds U+FFFD; their "replace" puts "?", as MySQL's conversions do.
    codec = CHARSET_CODECS.get(charset, "ascii")
    return text.encode(codec, "replace").decode(codec)


def fit_to_columns(
    cursor: Any, values: dict[str, Any], fields: list[Field[Any, Any]]
) -> dict[str, str]:
    """The text among ``values`` that the job table's columns cannot hold whole, narrowed to
    their character sets (``fit_to_charset``). Their character sets are read from
    ``information_schema``, once per refused statement: a table converted since would make a
    remembered one wrong."""
    cursor.execute(
        "SELECT column_name, character_set_name FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name = %s AND character_set_name IS NOT NULL",
        [Job._meta.db_table],
    )
    charsets = {column.lower(): charset.lower() for column, charset in cursor.fetchall()}
    narrowed = {}
    for field in fields:
        value = values[field.name]
        charset = charsets.get((field.column or field.attname).lower())
        if isinstance(value, str) and charset is not None:
            fitted = fit_to_charset(value, charset)
            if fitted != value:
                narrowed[field.name] = fitted
    return narrowed


if TYPE_CHECKING:
    # Field is only subscriptable under django-stubs; the alias exists for the type checker.
    _StartStatement = tuple[str, list[Field[Any, Any]], list[tuple[Any, list[Any]]]]


def start_and_load(job_id: int, type_name: str, model: type[Job]) -> Job | None:
    """Move a pending job of ``type_name`` stored as ``model`` to started and return it loaded
    as ``model``, in one round trip, on PostgreSQL in autocommit mode.

    The compare-and-set of ``transition()``, fused with the load. Its commit does not wait for
    the disk (see ``handler.transition`` for why that is safe). None when
    the job is not pending, is of another type or model, or this database cannot do it: the
    caller then goes the long way, ``transition()`` and a load.
    """
    connection = one_statement_connection(model)
    if connection is None:
        return None
    statement = cached(
        ("start_and_load", model, connection.alias), lambda: _start_statement(model, connection)
    )
    if statement is None:
        return None
    sql, fields, converters = statement
    now = timezone.now()
    db_now = Job._meta.get_field("updated_at").get_db_prep_value(now, connection)
    with statement_cursor(connection) as cursor:
        cursor.execute(sql, [JobState.STARTED, db_now, db_now, job_id, JobState.PENDING, type_name])
        row = cursor.fetchone()
    if row is None:
        return None
    values = []
    for (col, field_converters), value in zip(converters, row, strict=True):
        for converter in field_converters:
            value = converter(value, col, connection)
        values.append(value)
    return model.from_db(connection.alias, [f.attname for f in fields], values)


def _start_statement(model: type[Job], connection: Any) -> _StartStatement | None:
    """``UPDATE job ... FROM <model's table> ... RETURNING`` every column of ``model``; None for
    models not stored as one table under ``Job`` (proxies, deeper inheritance)."""
    if model._meta.proxy or not issubclass(model, Job):
        return None
    job_table = Job._meta.db_table
    own_table = model._meta.db_table
    link = model._meta.parents.get(Job) if model is not Job else None
    if model is not Job and (link is None or len(model._meta.parents) != 1):
        return None
    fields = list(model._meta.concrete_fields)
    if any(f.model not in (Job, model) for f in fields):
        return None
    quote = connection.ops.quote_name
    columns = ", ".join(f"{quote(f.model._meta.db_table)}.{quote(f.column)}" for f in fields)
    job = quote(job_table)
    job_columns = {f.name: quote(f.column) for f in Job._meta.concrete_fields}

    def column(name: str) -> str:
        return f"{job}.{job_columns[name]}"

    sources = [f"({NO_FLUSH}) AS no_flush"]
    conditions = [f"{column('id')} = %s", f"{column('state')} = %s", f"{column('type')} = %s"]
    if link is not None:
        sources.append(quote(own_table))
        conditions.append(f"{quote(own_table)}.{quote(link.column)} = {column('id')}")
    assignments = ", ".join(
        f"{job_columns[name]} = %s" for name in ("state", "updated_at", "started_at")
    )
    sql = (
        f"UPDATE {job} SET {assignments} FROM {', '.join(sources)} "
        f"WHERE {' AND '.join(conditions)} RETURNING {columns}"
    )
    converters = []
    for field in fields:
        col = field.get_col(field.model._meta.db_table)
        converters.append(
            (col, connection.ops.get_db_converters(col) + col.get_db_converters(connection))
        )
    return sql, fields, converters


def saves_plainly(model: type[Job]) -> bool:
    """Whether ``model.save()`` is ``Job.save()`` with nobody listening to it, so that inserting
    the rows with our own SQL skips nothing."""
    return (
        model.save is Job.save
        and not pre_save.has_listeners(model)
        and not post_save.has_listeners(model)
    )


def insert_job(job: Job) -> bool:
    """Save a new job's ``Job`` row and its model's row in one statement (one round trip and one
    commit instead of four round trips), on PostgreSQL in autocommit mode. False, having
    written nothing, where ``job.save()`` must do it: another database, an open transaction,
    a model with its own ``save()``, save signal receivers, or fields the database fills."""
    model = type(job)
    connection = one_statement_connection(model)
    if connection is None or not saves_plainly(model):
        return False
    statement = cached(
        ("insert_job", model, connection.alias), lambda: _insert_statement(model, connection)
    )
    if statement is None:
        return False
    sql, fields = statement
    params = [f.get_db_prep_save(f.pre_save(job, True), connection) for f in fields]
    with statement_cursor(connection) as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        raise DataError(f"Inserting job {job!r} returned no row.")
    # What Model.save() leaves on the instance: its key (and parent link), a saved state.
    for field in (Job._meta.pk, model._meta.pk):
        setattr(job, field.attname, row[0])
    job._state.adding = False
    job._state.db = connection.alias
    return True


def _insert_plan(
    model: type[Job],
) -> tuple[list[Field[Any, Any]], list[Field[Any, Any]], Field[Any, Any]] | None:
    """The fields of a new job of ``model`` to insert: the ``Job`` row's (its key left out),
    the model's own row's, and the model's link to its ``Job`` row. None for models not stored
    as one table under ``Job``, or with fields the database fills."""
    if model._meta.proxy or model is Job or not issubclass(model, Job):
        return None
    link = model._meta.parents.get(Job)
    if link is None or len(model._meta.parents) != 1 or not Job._meta.pk.db_returning:
        return None
    job_fields = [f for f in Job._meta.local_concrete_fields if f is not Job._meta.pk]
    own_fields = [f for f in model._meta.local_concrete_fields if f is not link]
    if any(
        f.has_db_default() or getattr(f, "generated", False) or f.db_returning
        for f in job_fields + own_fields
    ):
        return None
    return job_fields, own_fields, link


def _columns(connection: Any, fields: list[Field[Any, Any]]) -> str:
    return ", ".join(connection.ops.quote_name(f.column) for f in fields)


def _placeholders(fields: list[Any]) -> str:
    return ", ".join("%s" for _ in fields)


def _insert_statement(
    model: type[Job], connection: Any
) -> tuple[str, list[Field[Any, Any]]] | None:
    """``WITH j AS (INSERT INTO job ... RETURNING id) INSERT INTO <model's table> ...``; None
    where ``_insert_plan`` has none."""
    plan = _insert_plan(model)
    if plan is None:
        return None
    job_fields, own_fields, link = plan
    quote = connection.ops.quote_name
    own_values = f", {_placeholders(own_fields)}" if own_fields else ""
    own_columns = f", {_columns(connection, own_fields)}" if own_fields else ""
    sql = (
        f"WITH new_job AS (INSERT INTO {quote(Job._meta.db_table)} "
        f"({_columns(connection, job_fields)}) VALUES ({_placeholders(job_fields)}) "
        f"RETURNING {quote(Job._meta.pk.column)}) "
        f"INSERT INTO {quote(model._meta.db_table)} ({quote(link.column)}{own_columns}) "
        f"VALUES ((SELECT {quote(Job._meta.pk.column)} FROM new_job){own_values}) "
        f"RETURNING {quote(link.column)}"
    )
    return sql, job_fields + own_fields


# Rows per INSERT of insert_jobs(): keeps each statement's text and parameters moderate.
BULK_INSERT_ROWS = 500


def insert_jobs(jobs: list[Job]) -> bool:
    """Save new jobs of one model, each a ``Job`` row and a row of the model, with the same
    few statements however many there are: one takes their ids from the ``Job`` table's
    sequence, then one ``INSERT`` per table for every ``BULK_INSERT_ROWS`` jobs. PostgreSQL
    only, inside the caller's transaction (``JobHandler.create_and_start_many`` opens one).
    False, having written nothing, where each job's ``save()`` must do it: the conditions of
    ``insert_job``, or a ``Job`` key without a sequence."""
    model = type(jobs[0])
    using = jobs_database()
    connection = connections[using]
    plan = _insert_plan(model)
    if (
        plan is None
        or router.db_for_write(model) != using
        or connection.vendor != "postgresql"
        or any(type(job) is not model for job in jobs)
        or not saves_plainly(model)
    ):
        return False
    job_fields, own_fields, link = plan
    quote = connection.ops.quote_name
    pk = Job._meta.pk
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
            [quote(Job._meta.db_table), pk.column, len(jobs)],
        )
        ids = [row[0] for row in cursor.fetchall()]
        if any(pk_value is None for pk_value in ids):
            return False
        for start in range(0, len(jobs), BULK_INSERT_ROWS):
            chunk = list(zip(jobs[start : start + BULK_INSERT_ROWS], ids[start:], strict=False))
            for table, key, fields in (
                (Job._meta.db_table, pk, job_fields),
                (model._meta.db_table, link, own_fields),
            ):
                row = f"({_placeholders([key, *fields])})"
                cursor.execute(
                    f"INSERT INTO {quote(table)} ({_columns(connection, [key, *fields])}) "
                    f"VALUES {', '.join(row for _ in chunk)}",
                    [
                        value
                        for job, job_id in chunk
                        for value in (
                            job_id,
                            *(
                                f.get_db_prep_save(f.pre_save(job, True), connection)
                                for f in fields
                            ),
                        )
                    ],
                )
    # What Model.save() leaves on each instance: its key (and parent link), a saved state.
    for job, job_id in zip(jobs, ids, strict=False):
        for field in (pk, link):
            setattr(job, field.attname, job_id)
        job._state.adding = False
        job._state.db = using
    return True
