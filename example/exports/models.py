from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.urls import reverse

from task_ferry.models import Job, JobState


def default_export_seconds() -> float:
    return settings.EXPORT_DEFAULT_SECONDS


class ExportJob(Job):
    """A CSV export of a (generated) sales table, written to a gzip file."""

    rows = models.PositiveIntegerField(
        default=5000, validators=[MinValueValidator(1), MaxValueValidator(1_000_000)]
    )
    # How long the export should take, so a person can watch the bar move.
    seconds = models.FloatField(
        default=default_export_seconds, validators=[MinValueValidator(0), MaxValueValidator(600)]
    )
    # For the demo: the export fails at this row, so the failed state and on_error can be seen.
    fail_at_row = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(1_000_000)]
    )
    # Written by the job: editable=False keeps them out of what API clients may set.
    output_path = models.CharField(max_length=500, blank=True, editable=False)
    output_size = models.PositiveBigIntegerField(null=True, blank=True, editable=False)

    def clean(self) -> None:
        if self.fail_at_row is not None and self.rows is not None and self.fail_at_row > self.rows:
            raise ValidationError(
                {"fail_at_row": f"Pick a row the export has: 1 to {self.rows:,}, or none."}
            )

    @property
    def output_name(self) -> str:
        return f"export-{self.pk}.csv.gz"

    @property
    def download_url(self) -> str | None:
        """Where the owner downloads the finished export's file; None before that."""
        if self.state != JobState.FINISHED or not self.output_path:
            return None
        return reverse("export-download", args=[self.pk])
