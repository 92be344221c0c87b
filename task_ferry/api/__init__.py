"""The REST API: ``path("api/jobs/", include("task_ferry.api.urls"))``."""
