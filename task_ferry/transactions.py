"""What the current transaction will do on commit.

Django keeps a transaction's on-commit callbacks in ``connection.run_on_commit``, as (savepoint
ids, callback, robust) per callback, and drops the callbacks of a savepoint rolled back. Code
that batches its work per transaction (the executors' outbox, the store's forgetting of deleted
jobs) finds its own pending callback there and adds to it, instead of registering one more.
"""

from __future__ import annotations

import functools
from typing import Any

from django.db import transaction


def pending_call(
    func: Any, using: str, *, same_savepoint: bool = False
) -> functools.partial[Any] | None:
    """The last ``functools.partial(func, ...)`` that the transaction open on ``using`` will
    call on commit; None outside a transaction or if there is none. With ``same_savepoint``,
    only one registered in the current savepoint: adding to it is then undone with it."""
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block:
        return None
    savepoints = set(connection.savepoint_ids)
    for entry in reversed(connection.run_on_commit):
        callback = entry[1]
        if (
            isinstance(callback, functools.partial)
            # Equal, not identical: a bound method is a new object at each access.
            and callback.func == func
            and (not same_savepoint or entry[0] == savepoints)
        ):
            return callback
    return None
