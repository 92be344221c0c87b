"""The job API at ``api/tasks/``, next to the project's own ``jobs/`` endpoints (job postings,
say), whose detail operation spectacular names ``jobs_retrieve`` as well."""

from django.urls import URLPattern, URLResolver, include, path
from rest_framework import serializers, viewsets
from rest_framework.routers import SimpleRouter

from tests.testapp.models import Marker


class PostingSerializer(serializers.ModelSerializer):
    class Meta:
        model = Marker
        fields = ["id", "name"]


class PostingViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Marker.objects.all()
    serializer_class = PostingSerializer


router = SimpleRouter()
router.register("jobs", PostingViewSet, basename="posting")

urlpatterns: list[URLPattern | URLResolver] = [
    path("api/tasks/", include("task_ferry.api.urls")),
    *router.urls,
]
