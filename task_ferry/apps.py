from django.apps import AppConfig


class TaskFerryConfig(AppConfig):
    name = "task_ferry"
    verbose_name = "Task ferry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from task_ferry import (
            checks,  # noqa: F401 - registers the system checks
            conf,  # noqa: F401 - connects the setting_changed receiver
        )
        from task_ferry.registry import job_type_registry

        job_type_registry.autodiscover()
