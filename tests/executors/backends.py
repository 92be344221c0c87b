"""django.tasks backends the tests configure by dotted path."""

from task_ferry.executors.django_tasks import tasks_api

if tasks_api is not None:
    from importlib import import_module

    DummyBackend = import_module(f"{tasks_api.__name__}.backends.dummy").DummyBackend

    class NoPriorityBackend(DummyBackend):
        """Stores tasks like DummyBackend, but has no notion of priority."""

        supports_priority = False

    class RefusingBackend(DummyBackend):
        """Refuses every task with an error no database stores as it is: a NUL, which
        PostgreSQL refuses in text, and more text than fits MariaDB's max_allowed_packet."""

        def enqueue(self, task, args, kwargs):
            raise ValueError("queue full\x00" + "x" * 20_000_000)
