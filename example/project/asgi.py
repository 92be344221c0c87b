"""ASGI entry point, for live progress by Server-Sent Events:
``uvicorn --app-dir example project.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
application = get_asgi_application()
