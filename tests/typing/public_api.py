"""Code a user writes against task_ferry's public API, checked by mypy with django-stubs
(tests/test_typing.py). Never run: only its types matter."""

from decimal import Decimal
from fractions import Fraction
from typing import Any, assert_type

from django.contrib.auth.models import User

from task_ferry.handler import JobHandler
from task_ferry.models import Job, JobQuerySet
from task_ferry.progress import Progress
from task_ferry.registry import JobType
from tests.testapp.models import ScriptedJob


def amounts(progress: Progress) -> None:
    progress.increment()
    progress.increment(2)
    progress.increment(0.5)
    progress.increment(Decimal("0.5"))
    progress.increment(Fraction(1, 3), state="a third")
    progress.create_child(represents=10, total=3.5)
    progress.create_child(represents=Decimal("12.5"), total=Fraction(7, 2))
    progress.total = Decimal("120")
    assert_type(progress.total, float)


def jobs_of(user: User) -> None:
    assert_type(JobHandler.get_jobs_for_user(user), JobQuerySet[Job])
    assert_type(Job.objects.live().get(), Job)
    assert_type(ScriptedJob.objects.for_user(user).pending().first(), ScriptedJob | None)


def stalled(jobs: JobQuerySet[ScriptedJob]) -> list[ScriptedJob]:
    """A queryset annotated with a job type's own model yields that model."""
    assert_type(jobs.running().get(), ScriptedJob)
    return list(jobs.running().filter(steps__gt=1))


class ScriptedJobType(JobType):
    """Every hook may take the type's own job model."""

    type = "typing-scripted"
    model_class = ScriptedJob

    def after_job_creation(self, job: ScriptedJob, values: dict[str, Any]) -> None:
        job.steps = 1

    def run(self, job: ScriptedJob, progress: Progress) -> None:
        progress.increment()

    def on_error(self, job: ScriptedJob, exc: BaseException) -> None:
        job.result = str(exc)

    def on_cancelled(self, job: ScriptedJob) -> None:
        job.result = "cancelled"
