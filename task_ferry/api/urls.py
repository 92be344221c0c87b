"""The REST API: ``path("api/jobs/", include("task_ferry.api.urls"))``. See docs/api.md."""

from importlib.util import find_spec

from django.urls import URLPattern, URLResolver, path
from rest_framework.routers import SimpleRouter

from task_ferry.api.events import job_events
from task_ferry.api.views import JobViewSet

app_name = "task_ferry"

router = SimpleRouter()
router.register("", JobViewSet, basename="job")

urlpatterns: list[URLPattern | URLResolver] = [
    path("<str:pk>/events/", job_events, name="job-events"),
]

if find_spec("drf_spectacular") is not None:
    from task_ferry.api.schema import JobSchemaView

    urlpatterns.append(path("schema/", JobSchemaView.as_view(), name="schema"))

urlpatterns += router.urls
