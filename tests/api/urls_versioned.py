"""The job API under a prefix with a URL argument, as DRF's ``URLPathVersioning`` wants it."""

from django.urls import include, re_path

urlpatterns = [
    re_path(r"^api/(?P<version>v1|v2)/jobs/", include("task_ferry.api.urls")),
]
