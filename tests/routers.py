"""Database routers of the tests that run with jobs in a database alias of their own."""

from task_ferry.models import Job


class JobsInTheirOwnDatabase:
    """Writes and reads jobs (task_ferry's tables and every job type's) through the "jobs" alias (the same database as "default", on a
    connection of its own, so its transactions are its own); everything else through
    "default"."""

    def db_for_read(self, model, **hints):
        if issubclass(model, Job) or model._meta.app_label == "task_ferry":
            return "jobs"
        return None

    db_for_write = db_for_read

    def allow_relation(self, obj1, obj2, **hints):
        return True


class JobsReadFromALaggingReplica:
    """Django's primary/replica layout: jobs are written through "default" and read through
    "replica", which has not caught up yet (it holds none of the rows)."""

    def db_for_read(self, model, **hints):
        if issubclass(model, Job) or model._meta.app_label == "task_ferry":
            return "replica"
        return None

    def allow_relation(self, obj1, obj2, **hints):
        return True
