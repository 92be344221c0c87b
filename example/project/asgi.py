"""ASGI entry point: ``manage.py runexample --asgi``, or
``uvicorn project.asgi:application --timeout-graceful-shutdown 2`` from example/ (without
it, a stop waits for open event streams). With REDIS_URL set, progress bars get a
pushed event stream."""

import os

from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
application = get_asgi_application()
if settings.DEBUG:
    # Development only: serve static files as runserver does.
    application = ASGIStaticFilesHandler(application)
