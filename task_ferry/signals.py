"""Signals sent after each job state change. Every one passes ``sender`` (the job's model
class) and ``job`` (the specific job instance); ``job_failed`` also passes ``exc``.

``job_created`` is sent inside the transaction that creates the job, as Django's ``post_save``
is: if that transaction rolls back, the job never existed. The others are sent once their state
change has been committed. A receiver that raises is logged with its traceback and does not stop
the others, nor the job's own state change.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.dispatch import Signal

if TYPE_CHECKING:
    from task_ferry.models import Job

__all__ = ["job_cancelled", "job_created", "job_failed", "job_finished", "job_started"]

logger = logging.getLogger("task_ferry")

job_created = Signal()
job_started = Signal()
job_finished = Signal()
job_failed = Signal()
job_cancelled = Signal()


def emit(signal: Signal, job: Job, **extra: Any) -> None:
    """Send ``signal`` for ``job`` to every receiver, logging the ones that raise."""
    for receiver, result in signal.send_robust(sender=type(job), job=job, **extra):
        if isinstance(result, Exception):
            # exc_info of the receiver's own exception, so error trackers group it correctly.
            logger.error(
                "Job %s: receiver %r of a job signal raised",
                job.pk,
                receiver,
                exc_info=result,
            )
