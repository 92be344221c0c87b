"""DEVELOPMENT ONLY: log every visitor in as the demo user, so the example works at once.

Anyone who can reach the server acts as that user (a superuser). The middleware refuses to
run unless DEBUG is on; never put it in a real project.
"""

from collections.abc import Callable

from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.core.exceptions import MiddlewareNotUsed
from django.http import HttpRequest, HttpResponse


def get_demo_user():
    user, created = get_user_model().objects.get_or_create(
        username=settings.DEMO_USERNAME, defaults={"is_staff": True, "is_superuser": True}
    )
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


class DemoLoginMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        if not settings.DEBUG:
            raise MiddlewareNotUsed("DemoLoginMiddleware only runs with DEBUG = True.")
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.user.is_authenticated:
            login(request, get_demo_user(), backend="django.contrib.auth.backends.ModelBackend")
        return self.get_response(request)
