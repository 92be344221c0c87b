from rest_framework.routers import SimpleRouter

from task_ferry.api.views import JobViewSet

app_name = "task_ferry"

router = SimpleRouter()
router.register("", JobViewSet, basename="job")

urlpatterns = router.urls
