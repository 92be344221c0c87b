"""The job API inside a project's own namespace (``api:task_ferry:job-list``), as a project
that names all its API routes under one namespace mounts it."""

from django.urls import include, path

api_v2 = [path("jobs/", include("task_ferry.api.urls"))]

urlpatterns = [
    path("api/v2/", include((api_v2, "api"), namespace="api")),
]
