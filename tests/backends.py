"""Other sessions of the test database, seen and ended from the test's own connection, as a
database administrator would: for the tests of lost connections, on PostgreSQL and on
MySQL/MariaDB."""

from __future__ import annotations

from django.db import connection

# By (vendor, only those in a transaction): the ids of the other sessions on the test database.
SESSION_QUERIES = {
    ("postgresql", False): (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    ),
    ("postgresql", True): (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
    ),
    ("mysql", False): (
        "SELECT id FROM information_schema.processlist "
        "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
    ),
    # InnoDB lists a transaction once it has touched a table.
    ("mysql", True): (
        "SELECT trx.trx_mysql_thread_id FROM information_schema.innodb_trx AS trx "
        "JOIN information_schema.processlist AS p ON p.id = trx.trx_mysql_thread_id "
        "WHERE p.db = DATABASE() AND trx.trx_mysql_thread_id <> CONNECTION_ID()"
    ),
}


def other_sessions(*, in_transaction: bool = False) -> list[int]:
    """The other sessions of the test database; with ``in_transaction``, only those holding an
    open transaction (a running job's)."""
    query = SESSION_QUERIES.get((connection.vendor, in_transaction))
    if query is None:
        raise NotImplementedError(f"no session list on {connection.vendor}")
    with connection.cursor() as cursor:
        cursor.execute(query)
        return [row[0] for row in cursor.fetchall()]


def end_sessions(session_ids: list[int] | None = None) -> int:
    """End the given sessions of the test database, or all but our own; how many were ended."""
    if session_ids is None:
        session_ids = other_sessions()
    with connection.cursor() as cursor:
        for session_id in session_ids:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_terminate_backend(%s)", [session_id])
            else:
                cursor.execute(f"KILL {int(session_id)}")
    return len(session_ids)


def our_session_id() -> int:
    """The id of this thread's session of the test database, for another to end it."""
    query = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}
    with connection.cursor() as cursor:
        cursor.execute(query[connection.vendor])
        return int(cursor.fetchone()[0])
