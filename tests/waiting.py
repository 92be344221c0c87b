"""Polling until something happens elsewhere (a worker, the monitor thread, a server)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 15,
    interval: float = 0.02,
    what: str | None = None,
    worker: Any = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that. After
    ``timeout`` seconds fail, naming ``what`` and showing ``worker.output()`` if given."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            log = f"\nworker output:\n{worker.output()}" if worker is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}{log}")
        time.sleep(interval)
