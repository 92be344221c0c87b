# The spec's README job type, as a user would copy it; fetch_rows and write_to_file stand in
# for "your code here".
import os
from dataclasses import dataclass

from task_ferry.registry import JobType

from .models import ExportJob


@dataclass
class Row:
    id: int


def fetch_rows(table_id):
    return [Row(id=i) for i in range(table_id * 10)]


def write_to_file(row):
    pass


class ExportJobType(JobType):
    type = "export_table"  # unique string identifier
    model_class = ExportJob
    max_count = 2  # max concurrent jobs per user

    def prepare_values(self, values: dict, user) -> dict:
        """Validate and transform kwargs before the Job row is created."""
        if "table_id" not in values:
            raise ValueError("table_id is required")
        return values

    def run(self, job: ExportJob, progress) -> None:
        """
        Do the actual work. Called inside the executor task.
        progress is a Progress object rooted at 100.
        """
        rows = fetch_rows(job.table_id)  # your code here
        progress.increment(10, state="Fetched rows")

        # Use a child for a sub-stage with its own step count.
        write_stage = progress.create_child(represents=80, total=len(rows))
        for row in rows:
            write_to_file(row)
            write_stage.increment(state=f"Writing row {row.id}...")

        progress.increment(10, state="Finalising")
        job.output_path = "/exports/result.csv"
        job.save(update_fields=["output_path"])

    def on_cancelled(self, job: ExportJob) -> None:
        if job.output_path:
            os.unlink(job.output_path)
