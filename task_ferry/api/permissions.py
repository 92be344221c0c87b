"""Who may see, follow, cancel and create which jobs through the API.

The class in ``TASK_FERRY["API_PERMISSION_CLASS"]`` decides; subclass ``IsJobOwner`` to change
its rules. Jobs a user may not see answer 404, never 403, so their existence does not leak.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from task_ferry.conf import ferry_settings
from task_ferry.models import Job, JobQuerySet
from task_ferry.registry import JobType

if TYPE_CHECKING:
    from rest_framework.views import APIView

__all__ = ["IsJobOwner", "IsJobOwnerOrStaff", "get_permission_class"]


class IsJobOwner(BasePermission):
    """Authenticated users see and cancel their own jobs only; staff included, system jobs
    (``user=None``) are visible to nobody."""

    def has_permission(self, request: Request, view: APIView | None) -> bool:
        user = request.user
        return bool(user and user.is_authenticated)

    def has_object_permission(self, request: Request, view: APIView | None, obj: Any) -> bool:
        return self.can_view(request, getattr(obj, "user_id", None))

    def sees_all_jobs(self, request: Request) -> bool:
        """True: this user sees every job, other users' and system jobs included."""
        return False

    def visible_jobs(self, request: Request, queryset: JobQuerySet[Job]) -> JobQuerySet[Job]:
        """The jobs this user may list, look up and follow."""
        if self.sees_all_jobs(request):
            return queryset
        return queryset.for_user(request.user)

    def can_view(self, request: Request, owner_id: Any) -> bool:
        """May this user see a job owned by ``owner_id`` (None for a system job)? Asked where
        only a snapshot is at hand (a live job's detail and event stream, answered from the
        progress store without a query)."""
        if self.sees_all_jobs(request):
            return True
        return owner_id is not None and str(owner_id) == str(request.user.pk)

    def lists_job(self, request: Request, job_id: int) -> bool:
        """Whether ``visible_jobs`` has the job, asked with ``can_view`` for a snapshot. Only
        a class that overrides ``visible_jobs`` pays a query for it: its rule may look at more
        than the owner (the type, a field, a tenant), which ``can_view`` cannot see."""
        if type(self).visible_jobs is IsJobOwner.visible_jobs:
            return True  # can_view() is the same rule.
        return self.visible_jobs(request, Job.objects.filter(pk=job_id)).exists()

    def can_cancel(self, request: Request, job: Job) -> bool:
        """Called for a job this user can see; False answers 404."""
        return True

    def can_create(self, request: Request, job_type: JobType) -> bool:
        """Asked for types whose ``api_create`` is true. False hides the type from ``POST /``:
        it is then an unknown type to this user."""
        return True


class IsJobOwnerOrStaff(IsJobOwner):
    """As ``IsJobOwner``, but staff see, follow and cancel every job, system jobs included."""

    def sees_all_jobs(self, request: Request) -> bool:
        return bool(getattr(request.user, "is_staff", False))


@functools.cache
def _import_permission_class(path: str) -> type[IsJobOwner]:
    permission_class: type[IsJobOwner] = import_string(path)
    return permission_class


def get_permission_class() -> type[IsJobOwner]:
    """The class named by ``TASK_FERRY["API_PERMISSION_CLASS"]``."""
    return _import_permission_class(str(ferry_settings.API_PERMISSION_CLASS))
