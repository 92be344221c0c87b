from pathlib import Path

from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import JobDoesNotExist
from task_ferry.handler import JobHandler
from task_ferry.models import JobState

from .models import ExportJob

PAGE_SIZE = 50


@login_required
@ensure_csrf_cookie
def job_list(request: HttpRequest) -> HttpResponse:
    """The user's jobs with live progress bars, and a form that starts an export."""
    jobs = list(JobHandler.get_jobs_for_user(request.user)[:PAGE_SIZE])
    exports = ExportJob.objects.in_bulk([job.pk for job in jobs])
    rows = [(job, exports.get(job.pk)) for job in jobs]
    # Only ASGI with Redis pushes events; elsewhere the stream polls every 2 s, we poll every 1 s.
    live_stream = isinstance(request, ASGIRequest) and bool(ferry_settings.REDIS_URL)
    return render(
        request,
        "exports/job_list.html",
        {
            "rows": rows,
            "live_stream": live_stream,
            "default_seconds": ExportJob._meta.get_field("seconds").get_default(),
        },
    )


@login_required
def download(request: HttpRequest, job_id: int) -> FileResponse:
    try:
        job = JobHandler.get_job(request.user, job_id)
    except JobDoesNotExist as exc:
        raise Http404(str(exc)) from exc
    if not isinstance(job, ExportJob) or job.state != JobState.FINISHED or not job.output_path:
        raise Http404("This export has no file (yet).")
    path = Path(job.output_path)
    if not path.is_file():
        raise Http404("The export file was removed.")
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name)
