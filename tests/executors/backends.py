"""django.tasks backends the tests configure by dotted path."""

from task_ferry.executors.django_tasks import tasks_api

if tasks_api is not None:
    from importlib import import_module

    DummyBackend = import_module(f"{tasks_api.__name__}.backends.dummy").DummyBackend

    class NoPriorityBackend(DummyBackend):
        """Stores tasks like DummyBackend, but has no notion of priority."""

        supports_priority = False
