# mypy: disallow-any-generics
"""A job type that names its model, ``JobType[ExportJob]``, checked by mypy with django-stubs
(tests/test_typing.py). Never run: only its types matter. An expected error is a
``# type: ignore[code]`` line: mypy runs with ``warn_unused_ignores``, so the check fails if the
error goes away. ``disallow-any-generics``, as under ``mypy --strict``: a subclass of plain
``JobType`` must still pass."""

from typing import Any, TypeVar, assert_type

from django.contrib.auth.models import User

from task_ferry.handler import JobHandler
from task_ferry.models import Job
from task_ferry.progress import Progress
from task_ferry.registry import JobType, job_type_registry
from tests.myapp.models import ExportJob
from tests.testapp.models import ScriptedJob


class ExportJobType(JobType[ExportJob]):
    type = "typing-export"
    model_class = ExportJob

    def prepare_values(self, values: dict[str, Any], user: Any) -> dict[str, Any]:
        assert_type(self.model_class, type[ExportJob])
        return values

    def run(self, job: ExportJob, progress: Progress) -> None:
        assert_type(job.table_id, int)

    def on_cancelled(self, job: Job) -> None:
        """A hook may take any job a wider type allows."""


class ReadmeExportJobType(JobType):
    """As the README writes it: the hooks take what they declare."""

    type = "typing-readme-export"
    model_class = ExportJob

    def run(self, job: ExportJob, progress: Progress) -> None:
        progress.increment()


class WrongModelJobType(JobType[ExportJob]):
    type = "typing-wrong"
    model_class = ScriptedJob  # type: ignore[assignment]

    def run(self, job: ScriptedJob, progress: Progress) -> None:  # type: ignore[override]
        pass


AuditedJobT = TypeVar("AuditedJobT", bound=Job)


class AuditedJobType(JobType[AuditedJobT]):
    """A shared base that leaves the model to each type."""

    def on_error(self, job: AuditedJobT, exc: BaseException) -> None:
        assert_type(job.pk, int)


class AuditedExportJobType(AuditedJobType[ExportJob]):
    type = "typing-audited-export"
    model_class = ExportJob

    def on_error(self, job: ExportJob, exc: BaseException) -> None:
        assert_type(job.output_path, str)


def start(user: User) -> None:
    assert_type(JobHandler.create_and_start(user, ExportJobType, table_id=1), ExportJob)
    assert_type(JobHandler.create_and_start(user, AuditedExportJobType, table_id=1), ExportJob)
    assert_type(
        JobHandler.create_and_start(user=user, job_type_name=ExportJobType, table_id=1), ExportJob
    )
    assert_type(JobHandler.create_and_start(user, "typing-export", table_id=1), Job)
    assert_type(JobHandler.create_and_start(user, ReadmeExportJobType, table_id=1), Any)
    assert_type(
        JobHandler.create_and_start_many(user, ExportJobType, [{"table_id": 1}]), list[ExportJob]
    )
    assert_type(JobHandler.create_and_start_many(user, "typing-export", []), list[Job])
    JobHandler.create_and_start(user, ExportJob, table_id=1)  # type: ignore[arg-type]
    JobHandler.create_and_start(user, ExportJobType(), table_id=1)  # type: ignore[call-overload]


def registry() -> None:
    assert_type(job_type_registry.get_by_class(ExportJobType), JobType[ExportJob])
    assert_type(job_type_registry.register(ExportJobType), JobType[ExportJob])
    assert_type(job_type_registry.get("typing-export"), JobType[Any])


async def start_from_an_async_view(user: User) -> None:
    assert_type(await JobHandler.acreate_and_start(user, ExportJobType, table_id=1), ExportJob)
    assert_type(
        await JobHandler.acreate_and_start(user=user, job_type_name=ExportJobType, table_id=1),
        ExportJob,
    )
    assert_type(await JobHandler.acreate_and_start(user, "typing-export", table_id=1), Job)
    assert_type(await JobHandler.acreate_and_start(user, ReadmeExportJobType, table_id=1), Any)
    assert_type(
        await JobHandler.acreate_and_start_many(user, ExportJobType, [{"table_id": 1}]),
        list[ExportJob],
    )
    assert_type(await JobHandler.acreate_and_start_many(user, "typing-export", []), list[Job])
    assert_type(await JobHandler.aget_job(user, 1), Job)
    assert_type(await JobHandler.acancel(user, 1), Job)
    assert_type(await JobHandler.acleanup_old_jobs(), int)
    await JobHandler.acreate_and_start(user, ExportJob, table_id=1)  # type: ignore[arg-type]
