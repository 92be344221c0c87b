"""The test project's URLs plus the baseline of the poll benchmark."""

from django.conf import settings
from django.http import HttpResponse
from django.urls import path
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.views import APIView

from task_ferry.stores.base import get_store
from tests.urls import urlpatterns as project_urlpatterns


class BareSnapshotView(APIView):
    """The least a poll can do: DRF session auth, one Redis GET, the bytes as they are."""

    authentication_classes = [SessionAuthentication]
    permission_classes = [IsAuthenticated]

    def get(self, request: Request, pk: int) -> HttpResponse:
        store = get_store()
        raw = store.client.get(f"{settings.TASK_FERRY['KEY_PREFIX']}:job:{pk}")
        return HttpResponse(raw, content_type="application/json")


urlpatterns = [
    path("bare/<int:pk>/", BareSnapshotView.as_view()),
    *project_urlpatterns,
]
