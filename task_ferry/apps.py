from django.apps import AppConfig


class TaskFerryConfig(AppConfig):
    name = "task_ferry"
    verbose_name = "Task ferry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from task_ferry import (
            checks,  # noqa: F401 - registers the system checks
            conf,  # noqa: F401 - connects the setting_changed receiver
        )
        from task_ferry.handler import forget_deleted_job
        from task_ferry.models import Job
        from task_ferry.registry import job_type_registry

        # Sent for the Job part of every job, whichever model the delete went through.
        post_delete.connect(forget_deleted_job, sender=Job, dispatch_uid="task_ferry.forget")
        job_type_registry.autodiscover()
