"""Other sessions of the test database, seen and ended from the test's own connection, as a
database administrator would: for the tests of lost connections, on PostgreSQL and on
MySQL/MariaDB."""

from __future__ import annotations

from django.db import connection


def sessions_in_transaction() -> list[int]:
    """Other sessions of the test database holding an open transaction (a running job's)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
            )
        elif connection.vendor == "mysql":
            # InnoDB lists a transaction once it has touched a table.
            cursor.execute(
                "SELECT trx.trx_mysql_thread_id FROM information_schema.innodb_trx AS trx "
                "JOIN information_schema.processlist AS p ON p.id = trx.trx_mysql_thread_id "
                "WHERE p.db = DATABASE() AND trx.trx_mysql_thread_id <> CONNECTION_ID()"
            )
        else:
            raise NotImplementedError(f"no session list on {connection.vendor}")
        return [row[0] for row in cursor.fetchall()]


def end_sessions(session_ids: list[int] | None = None) -> int:
    """End the given sessions of the test database, or all but our own; how many were ended."""
    with connection.cursor() as cursor:
        if session_ids is None:
            if connection.vendor == "postgresql":
                cursor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
            elif connection.vendor == "mysql":
                cursor.execute(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                )
            else:
                raise NotImplementedError(f"no session list on {connection.vendor}")
            session_ids = [row[0] for row in cursor.fetchall()]
        for session_id in session_ids:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_terminate_backend(%s)", [session_id])
            else:
                cursor.execute(f"KILL {int(session_id)}")
    return len(session_ids)
