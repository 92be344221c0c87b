"""The transactions task_ferry takes part in: what they will do on commit, and on SQLite the
write lock taken before they read.

Django keeps a transaction's on-commit callbacks in ``connection.run_on_commit``, as (savepoint
ids, callback, robust) per callback, and drops the callbacks of a savepoint rolled back. Code
that batches its work per transaction (the executors' outbox, the store's forgetting of deleted
jobs) finds its own pending callback there and adds to it, instead of registering one more.

Each lookup is remembered for as long as the list is the same object: Django replaces it at
every commit, rollback and rollback to a savepoint, the only times a callback leaves it. A
delete of many jobs in a transaction that also holds a callback per row of the project's own
would otherwise scan past all of them, once per job.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper

# SQLite transaction modes (Django's OPTIONS["transaction_mode"]) that take the write lock at
# BEGIN already.
LOCKING_TRANSACTION_MODES = frozenset(["IMMEDIATE", "EXCLUSIVE"])

MEMO_ATTRIBUTE = "_task_ferry_pending_calls"

Key = tuple[Any, frozenset[str] | None]


def pending_call(
    func: Any, using: str, *, same_savepoint: bool = False
) -> functools.partial[Any] | None:
    """The last ``functools.partial(func, ...)`` that the transaction open on ``using`` will
    call on commit; None outside a transaction or if there is none. With ``same_savepoint``,
    only one registered in the current savepoint: adding to it is then undone with it."""
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block:
        return None
    memo = _memo(connection)
    key = _key(connection, func, same_savepoint)
    if key in memo:
        return memo[key]
    savepoints = set(connection.savepoint_ids)
    found = None
    for entry in reversed(connection.run_on_commit):
        callback = entry[1]
        if (
            isinstance(callback, functools.partial)
            # Equal, not identical: a bound method is a new object at each access.
            and callback.func == func
            and (not same_savepoint or entry[0] == savepoints)
        ):
            found = callback
            break
    memo[key] = found
    return found


def after_commit(callback: Callable[[], None], using: str) -> None:
    """Call ``callback`` once the transaction open on ``using`` commits (at once in autocommit
    mode), and never if it rolls back: the store, a hook or a receiver must not announce a
    state change that a rollback undoes. Robust, so that a callback of ours that raises is
    logged and never stops the caller's own callbacks (an executor's dispatch)."""
    transaction.on_commit(callback, using=using, robust=True)


def call_on_commit(
    callback: functools.partial[Any], using: str, *, same_savepoint: bool = False
) -> None:
    """``transaction.on_commit(callback)``, which ``pending_call(callback.func, ...)`` then
    finds without a scan."""
    transaction.on_commit(callback, using=using)
    connection = transaction.get_connection(using)
    if connection.in_atomic_block:
        _memo(connection)[_key(connection, callback.func, same_savepoint)] = callback


def _key(connection: BaseDatabaseWrapper, func: Any, same_savepoint: bool) -> Key:
    return (func, frozenset(connection.savepoint_ids) if same_savepoint else None)


def _memo(connection: BaseDatabaseWrapper) -> dict[Key, functools.partial[Any] | None]:
    # The list itself is kept, not its id(): a new list may get the id of one collected.
    memo: tuple[list[Any], dict[Key, functools.partial[Any] | None]] | None = getattr(
        connection, MEMO_ATTRIBUTE, None
    )
    if memo is None or memo[0] is not connection.run_on_commit:
        memo = (connection.run_on_commit, {})
        setattr(connection, MEMO_ATTRIBUTE, memo)
    return memo[1]


def lock_for_writing(using: str) -> None:
    """On SQLite, take the database's write lock now, before the open transaction reads.

    SQLite begins a transaction deferred: it reads from a snapshot and asks for the write lock
    at its first write. If another connection (a worker) committed in between, that write fails
    at once with "database is locked": the busy timeout does not apply, as waiting cannot make
    the snapshot current. task_ferry's transactions that read before they write (the
    ``max_count`` check, the sweep) call this first, so that they wait for the lock instead, as
    ``OPTIONS["transaction_mode"] = "IMMEDIATE"`` would make every transaction do. Elsewhere,
    outside a transaction, or with that option set, it does nothing.
    """
    connection = transaction.get_connection(using)
    if (
        connection.vendor != "sqlite"
        or not connection.in_atomic_block
        or getattr(connection, "transaction_mode", None) in LOCKING_TRANSACTION_MODES
    ):
        return
    from task_ferry.models import Job

    table = connection.ops.quote_name(Job._meta.db_table)
    column = connection.ops.quote_name(Job._meta.pk.column)
    with connection.cursor() as cursor:
        # A write statement takes the lock even when it changes no row.
        cursor.execute(f"UPDATE {table} SET {column} = {column} WHERE 0")
