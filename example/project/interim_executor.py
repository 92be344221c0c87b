"""INTERIM: stands in for task_ferry.executors.django_tasks until the dtasks branch is merged."""

from django.db import transaction
from django_tasks import task

from task_ferry.executors.base import BaseExecutor


@task()
def run_job(job_id: int) -> None:
    from task_ferry.handler import JobHandler

    JobHandler.run_job(job_id)


class InterimExecutor(BaseExecutor):
    def enqueue(self, job_id: int) -> None:
        transaction.on_commit(lambda: run_job.enqueue(job_id))
