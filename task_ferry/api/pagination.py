from __future__ import annotations

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request


class JobPagination(LimitOffsetPagination):
    """DRF's limit/offset page, but a bad ``limit`` or ``offset`` is a 400, not ignored."""

    default_limit = 50
    max_limit = 200

    def get_limit(self, request: Request) -> int:
        return self._whole_number(request, self.limit_query_param, self.default_limit, 1)

    def get_offset(self, request: Request) -> int:
        return self._whole_number(request, self.offset_query_param, 0, 0)

    def _whole_number(self, request: Request, name: str, default: int, minimum: int) -> int:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return default
        maximum = self.max_limit if name == self.limit_query_param else 2**62
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if not minimum <= value <= maximum:
            raise ValidationError(
                {name: [f"Must be a whole number from {minimum} to {maximum}, got {raw!r}."]}
            )
        return value
