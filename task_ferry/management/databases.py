"""What the commands say when a database cannot be reached: one line naming it, not a
traceback, for the operator reading cron mail or a container's log."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import InterfaceError, OperationalError
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.models.sql.compiler import SQLCompiler

#: The errors of a database that is down, unreachable or refusing the connection, and of a
#: connection lost midway; not all of them are: SQLite reports a missing table with one.
CONNECTION_ERRORS = (OperationalError, InterfaceError)

# Methods of a database wrapper that open its connection: an error raised in one of them means
# the server could not be reached or refused this login.
CONNECTING = frozenset({"connect", "get_new_connection", "init_connection_state"})


@contextlib.contextmanager
def database_outage_reported() -> Iterator[None]:
    """Turn a database outage inside into a ``CommandError`` that says which database and what
    to check: Django prints it on stderr as one line and exits with status 1 (``--traceback``
    still shows the driver's error). Other database errors go on with their traceback."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        message = outage_message(exc)
        if message is None:
            raise
        raise CommandError(message) from exc


class OutageReportingCommand(BaseCommand):
    """A command that reports a database outage as ``database_outage_reported()`` does."""

    def execute(self, *args: Any, **options: Any) -> str | None:
        with database_outage_reported():
            return super().execute(*args, **options)


def outage_message(exc: BaseException) -> str | None:
    """One line for an error of a database that could not be reached or was lost: which one
    (alias, engine, host, port, name, user; never the password), the driver's error and what
    to check. None for another error (a lock timeout, a missing table), which is no outage."""
    if not isinstance(exc, CONNECTION_ERRORS):
        return None
    connection, connecting = failed_connection(exc.__traceback__)
    if connection is None or not (connecting or lost(connection)):
        return None
    error = " ".join(str(exc).split()) or type(exc).__name__
    password = connection.settings_dict.get("PASSWORD")
    if password:
        # Drivers leave it out of their messages; this makes sure of it.
        error = error.replace(str(password), "***")
    alias = connection.alias
    where = f"DATABASES[{alias!r}] ({described(connection)})"
    if connection.vendor == "sqlite":
        check = (
            f"Check NAME in DATABASES[{alias!r}], and that its directory exists and is writable."
        )
    else:
        check = (
            f"Check that the server is running and reachable from here, and HOST, PORT, NAME, "
            f"USER and PASSWORD in DATABASES[{alias!r}]."
        )
    if connecting:
        return f"Could not connect to the database {where}: {error} {check}"
    return f"Lost the connection to the database {where}: {error} {check}"


def lost(connection: BaseDatabaseWrapper) -> bool:
    """Whether the connection no longer works (the server went away after it was opened)."""
    try:
        return connection.connection is None or not connection.is_usable()
    except Exception:
        # Never raise from here: the sweeper's loop calls this to log a failed round.
        return True


def failed_connection(
    traceback: TracebackType | None,
) -> tuple[BaseDatabaseWrapper | None, bool]:
    """The database connection whose call raised, found in the traceback (Django's errors do not
    carry it, and with a router jobs may live on another alias than ``default``), and whether it
    raised while connecting."""
    found: BaseDatabaseWrapper | None = None
    connecting = False
    while traceback is not None:
        frame = traceback.tb_frame
        owner = frame.f_locals.get("self")
        # A cursor and an SQL compiler hold their connection.
        if isinstance(owner, CursorWrapper):
            owner = owner.db
        elif isinstance(owner, SQLCompiler):
            owner = owner.connection
        if isinstance(owner, BaseDatabaseWrapper):
            found = owner
            connecting = frame.f_code.co_name in CONNECTING
        traceback = traceback.tb_next
    return found, connecting


def engine_name(connection: BaseDatabaseWrapper) -> str:
    """ "PostgreSQL", say, without a query: MySQL's ``display_name`` asks the server whether it
    is MariaDB, which is what just failed."""
    name = getattr(type(connection), "display_name", None)
    if isinstance(name, str):
        return name
    return "MySQL or MariaDB" if connection.vendor == "mysql" else connection.vendor


def described(connection: BaseDatabaseWrapper) -> str:
    settings = connection.settings_dict
    name = settings.get("NAME")
    if connection.vendor == "sqlite":
        return f"SQLite, file {str(name)!r}"
    host = settings.get("HOST") or "localhost"
    port = settings.get("PORT") or "default port"
    parts = [engine_name(connection), f"{host}:{port}", f"database {str(name)!r}"]
    if settings.get("USER"):
        parts.append(f"user {str(settings['USER'])!r}")
    return ", ".join(parts)
