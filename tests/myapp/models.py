# The spec's README model, as a user would copy it.
from django.db import models

from task_ferry.models import Job


class ExportJob(Job):
    table_id = models.IntegerField()
    output_path = models.CharField(max_length=500, blank=True)

    class Meta:
        app_label = "myapp"
