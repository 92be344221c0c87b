# The spec's README model, as a user would copy it.
from django.db import models

from task_ferry.models import Job


class ExportJob(Job):
    table_id = models.IntegerField()
    # Written by run(), removed by on_cancelled: editable=False keeps API clients from setting it.
    output_path = models.CharField(max_length=500, blank=True, editable=False)

    class Meta:
        app_label = "myapp"
