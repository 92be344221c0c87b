"""django-task-ferry: background jobs for Django with live progress and cancellation."""

__version__ = "0.2.0.dev0"
