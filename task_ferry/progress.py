"""Hierarchical progress: plain numbers in memory, no I/O.

The root counts to 100. ``create_child(represents, total)`` makes a stage worth ``represents``
of its parent that counts to its own ``total``. The job's monitor thread reads the root's
numbers on its own cadence and publishes them; a cancel request reaches the job through
``request_cancel()`` and is raised as ``JobCancelled`` at the next ``increment()``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from task_ferry.exceptions import JobCancelled

__all__ = ["Progress"]

T = TypeVar("T")
_INFINITY = math.inf


def _count(value: object, name: str) -> float:
    """``value`` as a float, if it is a real, finite number >= 0; else a ValueError saying so."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if 0 <= number < _INFINITY:
            return number
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class Progress:
    __slots__ = (
        "_cancel_requested",
        "_parent",
        "_represents",
        "_root",
        "_scale",
        "done",
        "state",
        "total",
    )

    def __init__(self, total: float = 100) -> None:
        self.total: float = _count(total, "total")
        self.done: float = 0
        #: Latest human-readable label; only the root's is published.
        self.state: str = ""
        self._parent: Progress | None = None
        self._root: Progress = self
        # Parent steps this node is worth, and parent steps per step of this node.
        self._represents: float = 0
        self._scale: float = 1.0
        self._cancel_requested = False

    @property
    def percentage(self) -> int:
        """Whole percent done, 0 to 100."""
        if self.total <= 0:
            return 100
        return min(100, int(self.done * 100 / self.total + 1e-9))

    @property
    def cancel_requested(self) -> bool:
        return self._root._cancel_requested

    def request_cancel(self) -> None:
        """Make the next ``increment()`` anywhere in this tree raise ``JobCancelled``."""
        self._root._cancel_requested = True

    def increment(self, by: float = 1, state: str | None = None) -> None:
        """Advance by ``by`` steps of this node, optionally with a new state label."""
        root = self._root
        if root._cancel_requested:
            raise JobCancelled("The job was cancelled.")
        # Plain ints and floats take the fast path; anything else is checked and converted.
        if by.__class__ is int or by.__class__ is float:
            if not 0 <= by < _INFINITY:
                raise ValueError(f"increment(by=...) must be a finite number >= 0, got {by!r}")
        else:
            by = _count(by, "increment(by=...)")
        if state is not None:
            if not isinstance(state, str):
                raise ValueError(f"state must be a str, got {type(state).__name__}")
            root.state = state
        self._advance(by)

    def _advance(self, by: float) -> None:
        done = self.done + by
        if done > self.total:
            done = self.total
        delta = done - self.done
        self.done = done
        if delta and self._parent is not None:
            self._parent._advance(delta * self._scale)

    def set_state(self, state: str) -> None:
        """Change the label without advancing."""
        self.increment(0, state=state)

    def create_child(self, represents: float, total: float) -> Progress:
        """A stage worth ``represents`` steps of this node, counting to its own ``total``."""
        represents = _count(represents, "represents")
        child = Progress(total)
        child._parent = self
        child._root = self._root
        child._represents = represents
        child._set_total(total)
        return child

    def _set_total(self, total: float) -> None:
        self.total = total
        if self._parent is None:
            return
        if total > 0:
            self._scale = self._represents / total
        elif self.done == 0:
            # An empty stage is complete at once.
            self._parent._advance(self._represents)

    def track(self, iterable: Iterable[T], state: str | None = None) -> Iterator[T]:
        """Yield from ``iterable``, incrementing by one after each item.

        A sized iterable (``len()`` works) sets this node's total first.
        """
        if isinstance(iterable, Sized) and self.done == 0:
            self._set_total(len(iterable))
        for item in iterable:
            yield item
            self.increment(1, state=state)

    def __repr__(self) -> str:
        return f"<Progress {self.done:g}/{self.total:g} ({self.percentage}%) {self.state!r}>"
