from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db.models import QuerySet
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from task_ferry.api.serializers import JobCreateSerializer, JobSerializer
from task_ferry.exceptions import (
    InvalidJobValues,
    JobDoesNotExist,
    JobTypeDoesNotExist,
    MaxJobCountExceeded,
    ProgressStoreUnavailable,
)
from task_ferry.handler import JobHandler, parse_job_id
from task_ferry.models import Job
from task_ferry.snapshot import PUBLIC_FIELDS
from task_ferry.stores.base import get_store


class JobViewSet(mixins.ListModelMixin, viewsets.GenericViewSet[Job]):
    """The caller's jobs: list, create, detail (live from the progress store) and cancel."""

    serializer_class = JobSerializer
    permission_classes = [permissions.IsAuthenticated]

    def get_queryset(self) -> QuerySet[Job]:
        queryset: QuerySet[Job] = JobHandler.get_jobs_for_user(self.request.user)
        return queryset

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        job_id = self._parse_id(pk)
        try:
            snapshot = get_store().read(job_id)
        except ProgressStoreUnavailable:
            snapshot = None
        if snapshot is not None and snapshot.get("user_id") == request.user.pk:
            return Response({key: snapshot[key] for key in PUBLIC_FIELDS})
        job = self._get_job(job_id)
        return Response(self.get_serializer(job).data)

    def create(self, request: Request) -> Response:
        data = request.data
        if not isinstance(data, Mapping):
            raise ValidationError({"non_field_errors": ["Expected a JSON object."]})
        type_serializer = JobCreateSerializer(data=data)
        type_serializer.is_valid(raise_exception=True)
        values = {k: v for k, v in data.items() if k != "type"}
        try:
            job = JobHandler.create_and_start(
                request.user, type_serializer.validated_data["type"], **values
            )
        except JobTypeDoesNotExist as exc:
            raise ValidationError({"type": [str(exc)]}) from exc
        except InvalidJobValues as exc:
            raise ValidationError(exc.errors or {"non_field_errors": [str(exc)]}) from exc
        except MaxJobCountExceeded as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_429_TOO_MANY_REQUESTS)
        return Response(self.get_serializer(job).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        try:
            job = JobHandler.cancel(request.user, self._parse_id(pk))
        except ProgressStoreUnavailable as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        except JobDoesNotExist as exc:
            raise NotFound(str(exc)) from exc
        return Response(self.get_serializer(job).data)

    @staticmethod
    def _parse_id(pk: Any) -> int:
        try:
            return parse_job_id(pk)
        except JobDoesNotExist as exc:
            raise NotFound(str(exc)) from exc

    def _get_job(self, job_id: int) -> Job:
        try:
            return JobHandler.get_job(self.request.user, job_id)
        except JobDoesNotExist as exc:
            raise NotFound(str(exc)) from exc
