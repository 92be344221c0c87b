"""Job types only the reliability tests use. Registered by the ``reliability_types`` fixture
and by the test worker process (``tests.reliability.worker``)."""

from __future__ import annotations

import time

from task_ferry.progress import Progress
from tests.testapp.job_types import ScriptedJobType
from tests.testapp.models import Marker, ScriptedJob


class WholeRowSaveJobType(ScriptedJobType):
    """Saves its whole (stale) instance with ``job.save()``, as careless job code does."""

    type = "whole_row_save"

    def run(self, job: ScriptedJob, progress: Progress) -> None:
        Marker.objects.create(name=job.marker)
        time.sleep(job.block_for)
        job.result = "done"
        job.save()
        progress.increment(100)
