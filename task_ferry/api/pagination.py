from __future__ import annotations

import re
from typing import Any

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request

# The largest offset taken: past any list there is, and within what every database takes as
# an OFFSET (a signed 64-bit number). Too large to tell a client as a range.
MAX_OFFSET = 2**62
# A whole number as a query parameter spells it: ASCII digits, a minus sign at most.
WHOLE_NUMBER = re.compile(r"-?[0-9]+")


class JobPagination(LimitOffsetPagination):
    """DRF's limit/offset page, but a bad ``limit`` or ``offset`` is a 400, not ignored."""

    default_limit = 50
    max_limit = 200

    def get_limit(self, request: Request) -> int:
        name = self.limit_query_param
        value = self._whole_number(request, name)
        if value is None:
            return self.default_limit
        if not 1 <= value <= self.max_limit:
            raise refused(request, name, f"Must be a whole number from 1 to {self.max_limit}")
        return value

    def get_offset(self, request: Request) -> int:
        name = self.offset_query_param
        value = self._whole_number(request, name)
        if value is None:
            return 0
        if value < 0:
            raise refused(request, name, "Must be a whole number, 0 or more")
        if value > MAX_OFFSET:
            raise refused(request, name, "Too large: no list has that many jobs to skip")
        return value

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        # The ranges a request must keep to, so that clients (and fuzzers) know them.
        bounds = {
            self.limit_query_param: {"minimum": 1, "maximum": self.max_limit},
            self.offset_query_param: {"minimum": 0, "maximum": MAX_OFFSET},
        }
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"] = {**parameter["schema"], **bounds.get(parameter["name"], {})}
        return parameters

    @staticmethod
    def _whole_number(request: Request, name: str) -> int | None:
        """The parameter as a number (-1 for what is not a whole number); None when it is not
        given."""
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return None
        # int() also reads "+5", " 5", "1_0" and other scripts' digits ("١٢").
        if not WHOLE_NUMBER.fullmatch(raw):
            return -1
        try:
            return int(raw)
        except ValueError:
            # More digits than int() converts: a number all the same, and a large one.
            return -1 if raw.startswith("-") else MAX_OFFSET + 1


def refused(request: Request, name: str, message: str) -> ValidationError:
    return ValidationError({name: [f"{message}, got {request.query_params.get(name)!r}."]})
