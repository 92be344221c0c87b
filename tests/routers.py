"""Database routers of the tests that run with jobs in a database alias of their own."""

from task_ferry.models import Job


class JobsInTheirOwnDatabase:
    """Writes and reads jobs through the "jobs" alias (the same database as "default", on a
    connection of its own, so its transactions are its own); everything else through
    "default"."""

    def db_for_read(self, model, **hints):
        return "jobs" if issubclass(model, Job) else None

    db_for_write = db_for_read

    def allow_relation(self, obj1, obj2, **hints):
        return True
