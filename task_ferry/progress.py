"""Hierarchical progress: plain numbers in memory, no I/O.

The root counts to 100. ``create_child(represents, total)`` makes a stage worth ``represents``
steps of its parent that counts to its own ``total``. A tick (``increment()``) only adds to the
node's own counter and stores the label on the root; the percentage is worked out from the tree
when somebody asks for it (the process's monitor thread, on its own cadence). A cancel request
reaches the job through ``request_cancel()`` and is raised as ``JobCancelled`` at the next tick.
"""

from __future__ import annotations

import contextlib
import decimal
import fractions
import math
import numbers
import sys
from collections.abc import Iterable, Iterator, Sized
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from task_ferry.exceptions import JobCancelled, JobTimeLimitExceeded

if TYPE_CHECKING:
    from django.utils.functional import Promise

__all__ = ["Progress"]

T = TypeVar("T")
#: A number of steps: an int, float, ``Decimal`` or ``Fraction``.
Amount: TypeAlias = float | decimal.Decimal | fractions.Fraction

# Completed children are folded into one number once a node has this many.
FOLD_CHILDREN_AT = 16
# The largest total or step: a node's fraction is worked out in floats.
MAX_AMOUNT = sys.float_info.max


class Progress:
    __slots__ = (
        "_cancel_raised",
        "_cancelled",
        "_children",
        "_done",
        "_fold_at",
        "_folded",
        "_label",
        "_parent",
        "_represents",
        "_root",
        "_time_limit",
        "_total",
    )

    def __init__(self, total: Amount = 100) -> None:
        self._total: float = _checked_amount("Progress(total=...)", total)
        self._done: float = 0
        self._root: Progress = self
        self._label: str = ""
        self._cancelled = False
        self._cancel_raised = False
        # Set (to the limit's seconds) with _cancelled when the job ran out of time.
        self._time_limit: float | None = None
        # Parent steps this node is worth when complete.
        self._represents: float = 0
        # (steps of children already complete and folded away, children still counted). One
        # tuple, replaced whole, so a reader on another thread always sees a consistent pair.
        self._children: tuple[float, list[Progress]] = (0, [])
        self._fold_at = FOLD_CHILDREN_AT
        self._parent: Progress | None = None
        # Counted in the parent's folded number instead of among its children.
        self._folded = False

    def increment(self, by: Amount = 1, state: str | Promise | None = None) -> None:
        """Advance by ``by`` steps of this node, optionally with a new state label: a ``str``,
        or a lazy translation, made a ``str`` here in the language active at this tick.

        Raises ``JobCancelled`` once the job was asked to stop.
        """
        root = self._root
        if root._cancelled:
            root._cancel_raised = True
            if root._time_limit is not None:
                raise JobTimeLimitExceeded(root._time_limit)
            raise JobCancelled("The job was cancelled.")
        if by.__class__ is not int or by < 0:
            # A step beyond the largest float is past any total: clamped below, like an int's.
            by = _checked_amount("increment(by=...)", by, clamp_huge=True)
        if state is not None:
            if state.__class__ is not str:
                state = _label(state)
            root._label = state
        try:
            done = self._done + by
        except OverflowError:
            # An int beyond the largest float, added to a float: past any total.
            done = self._total
        # Clamping here keeps an overshooting stage from counting for more than it represents.
        self._done = done if done < self._total else self._total

    @property
    def done(self) -> float:
        """Steps counted on this node itself (children report through their own counters).

        Assigning it is checked like a total (a bad value raises ``ValueError`` and changes
        nothing) and clamped to ``total`` as ``increment()`` clamps; a lower count makes the
        percentage go back, also for a stage folded away as complete.
        """
        return self._done

    @done.setter
    def done(self, done: Amount) -> None:
        checked = _checked_amount("Progress.done", done)
        falls = checked < self._done
        self._done = checked if checked < self._total else self._total
        if falls and self.fraction() < 1:
            # Folded away as complete, maybe, and no longer: nor, maybe, the nodes above it.
            self._count_again()

    @property
    def total(self) -> float:
        """Steps this node counts to; 0 makes it complete, whatever its children."""
        return self._total

    @total.setter
    def total(self, total: Amount) -> None:
        checked = _checked_amount("Progress.total", total)
        grows = checked > self._total
        self._total = checked
        if grows and self.fraction() < 1:
            # Folded away as complete, maybe, and no longer: nor, maybe, the nodes above it.
            self._count_again()

    def set_state(self, state: str | Promise | None) -> None:
        """Change the label without advancing; ``None`` clears it, as ``""`` does."""
        self.increment(0, state="" if state is None else state)

    @property
    def state(self) -> str:
        """The job's latest state label (shared by the whole tree)."""
        return self._root._label

    @property
    def cancel_requested(self) -> bool:
        return self._root._cancelled

    @property
    def cancel_raised(self) -> bool:
        """Whether a tick has raised ``JobCancelled``: the job was told to stop."""
        return self._root._cancel_raised

    def request_cancel(self) -> None:
        """Make the next ``increment()`` anywhere in this tree raise ``JobCancelled``."""
        self._root._cancelled = True

    @property
    def time_limit_reached(self) -> float | None:
        """The time limit, in seconds, that the job was stopped at; None while it was not."""
        return self._root._time_limit

    def stop_at_time_limit(self, time_limit: float) -> None:
        """Make the next ``increment()`` anywhere in this tree raise ``JobTimeLimitExceeded``:
        the job ran for ``time_limit`` seconds."""
        root = self._root
        root._time_limit = time_limit
        root._cancelled = True

    def create_child(self, represents: Amount, total: Amount) -> Progress:
        """A stage worth ``represents`` steps of this node, counting to its own ``total``.

        A child with ``total=0`` is complete at once.
        """
        child = Progress(_checked_amount("create_child(total=...)", total))
        child._root = self._root
        child._parent = self
        # A float, so that however many are folded together their sum cannot overflow.
        child._represents = float(_checked_amount("create_child(represents=...)", represents))
        folded, children = self._children
        if len(children) < self._fold_at:
            children.append(child)
            return child
        kept = []
        for old in children:
            # An empty child is complete, whatever its children, until it is given a total.
            if old._total == 0 or old.fraction() >= 1:
                folded += old._represents
                old._folded = True
            else:
                kept.append(old)
        kept.append(child)
        self._fold_at = max(FOLD_CHILDREN_AT, 2 * len(kept))
        self._children = (folded, kept)
        return child

    def fraction(self) -> float:
        """How much of this node is done, from 0.0 to 1.0, children included."""
        # A stack rather than recursion, so that children nest to any depth. Each entry: a node,
        # the steps counted for it so far, and its children still to count.
        folded, children = self._children
        stack = [(self, self._done + folded, iter(children))]
        while True:
            node, value, pending = stack[-1]
            for child in pending:
                folded, grandchildren = child._children
                if grandchildren:
                    stack[-1] = (node, value, pending)
                    stack.append((child, child._done + folded, iter(grandchildren)))
                    break
                value += child._represents * _ratio(child._done + folded, child._total)
            else:
                stack.pop()
                node_fraction = _ratio(value, node._total)
                if not stack:
                    return node_fraction
                parent, parent_value, siblings = stack[-1]
                stack[-1] = (parent, parent_value + node._represents * node_fraction, siblings)

    @property
    def percentage(self) -> int:
        """Whole percent done, 0 to 100."""
        return min(100, int(self.fraction() * 100 + 1e-9))

    def track(self, iterable: Iterable[T], state: str | Promise | None = None) -> Iterator[T]:
        """Yield from ``iterable``, incrementing by one after each item.

        A sized iterable (``len()`` works) on a node that has not counted anything yet, and
        has no children (whose worth a new total would rescale), sets the node's total first.
        """
        if isinstance(iterable, Sized) and self._done == 0 and self._children == (0, []):
            self.total = len(iterable)
        increment = self.increment
        for item in iterable:
            yield item
            increment(1, state)

    def _count_again(self) -> None:
        """Put this node, and every node above it folded away as complete, back among their
        parents' children, whose progress is worked out afresh at each look."""
        node = self
        while (parent := node._parent) is not None:
            if node._folded:
                folded, children = parent._children
                # One tuple, replaced whole: a reader sees the node counted once, either way.
                parent._children = (folded - node._represents, [*children, node])
                node._folded = False
            node = parent

    def __repr__(self) -> str:
        return f"<Progress {self._done:g}/{self.total:g} ({self.percentage}%) {self.state!r}>"


def _label(state: object) -> str:
    """``state`` as a label: a ``str`` (a subclass too), or ``str()`` of a lazy translation,
    in the language active now; anything else is a ``ValueError`` that names its class."""
    if isinstance(state, str):
        return state
    # Imported here: Progress needs no Django unless a lazy label is given.
    from django.utils.functional import Promise

    if isinstance(state, Promise):
        return str(state)
    kind = type(state)
    raise ValueError(
        f"state must be a str or a lazy translation, got {kind.__module__}.{kind.__qualname__};"
        f" pass str() of it"
    )


def _ratio(value: float, total: float) -> float:
    """``value`` steps of ``total`` as a fraction, 1.0 at most; an empty node is complete."""
    return 1.0 if value >= total or total <= 0 else value / total


def _checked_amount(name: str, value: object, *, clamp_huge: bool = False) -> float:
    """``value`` as a finite number >= 0 that a float holds, or a ``ValueError`` that says what
    was wrong. With ``clamp_huge``, a number beyond the largest float is the largest float."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if 0 <= value <= MAX_AMOUNT:
            return value
    elif isinstance(value, numbers.Real | decimal.Decimal):
        with contextlib.suppress(ArithmeticError, ValueError):
            number = float(value)
            if math.isfinite(number) and number >= 0:
                return number
    digits = _digits_beyond_a_float(value)
    if digits > 0:
        if clamp_huge:
            return MAX_AMOUNT
        raise ValueError(
            f"{name} must be at most {MAX_AMOUNT:.4g} (the largest float), got a number of "
            f"{digits} digits. Count in larger steps: only the ratio of steps to the total "
            f"matters."
        )
    shown = f"a negative number of {-digits} digits" if digits else repr(value)
    raise ValueError(f"{name} must be a finite number >= 0, got {shown}")


def _digits_beyond_a_float(value: object) -> int:
    """How many digits ``value`` has before its decimal point, negated for a negative number,
    if it is a finite number that a float cannot hold (``str()`` refuses an int beyond 4,300
    digits); else 0."""
    if isinstance(value, decimal.Decimal) and value.is_finite():
        if -MAX_AMOUNT <= value <= MAX_AMOUNT:
            return 0
        digits = value.adjusted() + 1
        return -digits if value < 0 else digits
    if isinstance(value, int | fractions.Fraction) and not -MAX_AMOUNT <= value <= MAX_AMOUNT:
        digits = int(abs(int(value)).bit_length() * math.log10(2)) + 1
        return -digits if value < 0 else digits
    return 0
