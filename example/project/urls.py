from django.contrib import admin
from django.urls import include, path
from exports import views

urlpatterns = [
    path("", views.job_list, name="job-list"),
    path("exports/<int:job_id>/download/", views.download, name="export-download"),
    path("api/jobs/", include("task_ferry.api.urls")),
    path("admin/", admin.site.urls),
]
