from django.apps import AppConfig, apps


class TaskFerryConfig(AppConfig):
    name = "task_ferry"
    verbose_name = "Task ferry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import class_prepared

        from task_ferry import (
            checks,  # noqa: F401 - registers the system checks
            conf,  # noqa: F401 - connects the setting_changed receiver
        )
        from task_ferry.checks import refuse_misplaced_tasks_backend
        from task_ferry.handler import forget_deletes_of, forget_deletes_of_new_model
        from task_ferry.registry import job_type_registry

        refuse_misplaced_tasks_backend()

        # Job and each proxy of it, one by one: a receiver of every model's deletes would cost
        # every other model its fast deletes (Django loads the rows of a model with receivers).
        for model in apps.get_models():
            forget_deletes_of(model)
        class_prepared.connect(forget_deletes_of_new_model, dispatch_uid="task_ferry.forget")
        job_type_registry.autodiscover()
