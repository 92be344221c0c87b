# The spec's README AppConfig: explicit registration next to autodiscovery is harmless.
from django.apps import AppConfig


class MyAppConfig(AppConfig):
    name = "tests.myapp"
    label = "myapp"

    def ready(self):
        from task_ferry.registry import job_type_registry

        from .job_types import ExportJobType

        job_type_registry.register(ExportJobType())
