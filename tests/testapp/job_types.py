import signal
import time
from typing import TypeVar

from task_ferry.models import Job
from task_ferry.registry import JobType

from .models import HookCall, LimitedJob, Marker, ScriptedJob

RecordedJobT = TypeVar("RecordedJobT", bound=Job)


class RecordingJobType(JobType[RecordedJobT]):
    """Records every ending hook call in HookCall rows. Generic, as a user's shared base may be:
    ScriptedJobType leaves its model unnamed, LimitedJobType names it."""

    def on_error(self, job, exc):
        HookCall.objects.create(job_id=job.pk, hook="on_error", detail=str(exc))

    def on_cancelled(self, job):
        HookCall.objects.create(job_id=job.pk, hook="on_cancelled")

    def before_delete(self, job):
        HookCall.objects.create(job_id=job.pk, hook="before_delete")


class ScriptedJobType(RecordingJobType):
    type = "scripted"
    model_class = ScriptedJob
    api_create = True

    def run(self, job, progress):
        if job.lock_own_row:
            Job.objects.select_for_update().get(pk=job.pk)
        if job.marker:
            Marker.objects.create(name=job.marker)
        if job.block_for:
            time.sleep(job.block_for)
        stage = progress.create_child(represents=100, total=job.steps)
        for i in range(job.steps):
            if job.tick_delay:
                time.sleep(job.tick_delay)
            if job.fail_at is not None and i == job.fail_at:
                raise RuntimeError(f"scripted failure at step {i}")
            stage.increment(state=f"step {i + 1} of {job.steps}")
        job.result = "done"
        job.save(update_fields=["result"])


class RoutedJobType(ScriptedJobType):
    """A scripted job sent to its own queue."""

    type = "routed"
    queue = "special"


class TimeLimitedJobType(ScriptedJobType):
    """A scripted job whose runs may take half a second. Its ``block_for`` holds SIGTERM off,
    as a call into C code that does not return to Python would: only SIGKILL stops it."""

    type = "time_limited"
    time_limit = 0.5

    def run(self, job, progress):
        if not job.block_for:
            return super().run(job, progress)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return super().run(job, progress)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class AutocommitJobType(ScriptedJobType):
    """A scripted job whose run is in autocommit mode: its writes commit as they go."""

    type = "autocommit"
    atomic = False


class LimitedJobType(RecordingJobType[LimitedJob]):
    type = "limited"
    model_class = LimitedJob
    max_count = 2
    api_create = True

    def run(self, job, progress):
        progress.increment(100)
