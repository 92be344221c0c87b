"""The example job type: a multi-stage export whose stages weigh differently."""

import csv
import datetime
import gzip
import hashlib
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings

from task_ferry.progress import Progress
from task_ferry.registry import JobType

from .models import ExportJob
from .serializers import ExportJobSerializer

# Share of the bar (of 100) and of the wall-clock time of each stage.
COLLECT_WEIGHT, WRITE_WEIGHT, CHECKSUM_WEIGHT, SAVE_WEIGHT = 20, 60, 15, 5
# Progress ticks per stage: enough for a smooth bar, few enough to be cheap.
TICKS_PER_STAGE = 25
REGIONS = ("North", "South", "East", "West")
PRODUCTS = ("Anchor", "Buoy", "Compass", "Deck chair", "Lantern", "Oar", "Rope", "Sail")


def export_dir() -> Path:
    path = Path(settings.EXPORT_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def chunks(total: int) -> Iterator[int]:
    """Sizes of TICKS_PER_STAGE (or fewer) chunks that add up to ``total``."""
    size = max(1, math.ceil(total / TICKS_PER_STAGE))
    for start in range(0, total, size):
        yield min(size, total - start)


class ExportFailed(Exception):
    """The failure an export was asked for with ``fail_at_row``."""

    def __init__(self, row: int) -> None:
        super().__init__(f"Failed at row {row}, as fail_at_row asked")
        # What the job's user sees (the API's human_readable_error); the message is for the logs.
        self.human_readable_error = f"The export stopped at row {row:,}, as you asked."


class ExportJobType(JobType[ExportJob]):
    type = "example_export"
    model_class = ExportJob
    serializer_class = ExportJobSerializer
    max_count = 5
    # The page starts exports through POST /api/jobs/.
    api_create = True

    def run(self, job: ExportJob, progress: Progress) -> None:
        # No database access until the end: on SQLite the job's transaction would otherwise
        # hold the write lock that the web server and the worker's heartbeat need.
        pause = job.seconds / 100 / TICKS_PER_STAGE
        rng = random.Random(job.pk)
        part = export_dir() / (job.output_name + ".part")

        collect = progress.create_child(represents=COLLECT_WEIGHT, total=job.rows)
        records: list[tuple[int, str, str, str, int, str]] = []
        day = datetime.date(2026, 1, 1)
        for size in chunks(job.rows):
            for _ in range(size):
                n = len(records) + 1
                quantity = rng.randint(1, 40)
                price = rng.randint(150, 9_900)
                records.append(
                    (
                        n,
                        (day + datetime.timedelta(days=n % 365)).isoformat(),
                        rng.choice(REGIONS),
                        rng.choice(PRODUCTS),
                        quantity,
                        f"{quantity * price / 100:.2f}",
                    )
                )
            collect.increment(size, state=f"Collecting rows: {len(records):,} of {job.rows:,}")
            time.sleep(pause * COLLECT_WEIGHT)

        write = progress.create_child(represents=WRITE_WEIGHT, total=job.rows)
        written = 0
        with gzip.open(part, "wt", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "date", "region", "product", "quantity", "amount"])
            for size in chunks(job.rows):
                if job.fail_at_row and job.fail_at_row <= written + size:
                    # Rows before it stay in the .part file, for on_error to remove.
                    writer.writerows(records[written : job.fail_at_row - 1])
                    raise ExportFailed(job.fail_at_row)
                writer.writerows(records[written : written + size])
                written += size
                write.increment(size, state=f"Writing CSV: row {written:,} of {job.rows:,}")
                time.sleep(pause * WRITE_WEIGHT)

        data = part.read_bytes()
        checksum = hashlib.sha256()
        checksum_stage = progress.create_child(represents=CHECKSUM_WEIGHT, total=len(data))
        offset = 0
        for size in chunks(len(data)):
            checksum.update(data[offset : offset + size])
            offset += size
            checksum_stage.increment(size, state="Checksumming the file")
            time.sleep(pause * CHECKSUM_WEIGHT)

        progress.set_state("Saving")
        final = part.with_name(job.output_name)
        part.replace(final)
        job.output_path = str(final)
        job.output_size = final.stat().st_size
        job.save(update_fields=["output_path", "output_size"])
        digest = checksum.hexdigest()[:12]
        progress.increment(SAVE_WEIGHT, state=f"Saved {job.rows:,} rows (sha256 {digest}…)")

    def on_cancelled(self, job: ExportJob) -> None:
        self._remove_files(job)

    def on_error(self, job: ExportJob, exc: BaseException) -> None:
        self._remove_files(job)

    def before_delete(self, job: ExportJob) -> None:
        self._remove_files(job)

    def _remove_files(self, job: ExportJob) -> None:
        final = Path(settings.EXPORT_DIR) / job.output_name
        for path in (final, final.with_name(final.name + ".part")):
            path.unlink(missing_ok=True)
