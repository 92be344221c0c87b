"""The OpenAPI description of the job API, through drf-spectacular (an optional dependency:
import this module only when it is installed).

Each registered job type gets its own components, ``<Type>Job`` for responses and
``<Type>JobCreate`` for ``POST /``, joined with ``oneOf`` and a discriminator on ``type``.
Importing this module registers an extension, so a project-wide spectacular schema describes
the job views the same way; ``JobSchemaView`` serves the job API's schema on its own.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiViewExtension
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ComponentRegistry, camelize_operation
from drf_spectacular.settings import spectacular_settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema_field,
    inline_serializer,
)
from drf_spectacular.views import SpectacularAPIView
from rest_framework import serializers

from task_ferry.api.permissions import get_permission_class
from task_ferry.api.serializers import JobSerializer, type_serializer_class
from task_ferry.models import JobState
from task_ferry.registry import JobType, job_type_registry

__all__ = ["JobAutoSchema", "JobSchemaView", "events_postprocessing_hook"]

_component_serializers: dict[tuple[str, str, type[Any]], type[serializers.Serializer[Any]]] = {}


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_"))


class ClosedCreateSerializer(serializers.Serializer[Any]):
    """Base of the create body of a type without its own ``prepare_values``: a key its
    serializer does not know is refused with 400 "Unknown field.", so the body is closed."""


class AmendingExtension(OpenApiSerializerExtension):
    """Describes its serializers (and their subclasses) as drf-spectacular would, then lets
    ``amend`` change the result. Has no ``target_class`` of its own, so it matches nothing."""

    match_subclasses = True

    def map_serializer(self, auto_schema: AutoSchema, direction: Any) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(
            self.target, direction, bypass_extensions=True
        )
        self.amend(schema)
        return schema

    def amend(self, schema: dict[str, Any]) -> None:
        raise NotImplementedError


class ClosedCreateExtension(AmendingExtension):
    """Describes a ``ClosedCreateSerializer`` with ``additionalProperties: false``."""

    target_class = ClosedCreateSerializer

    def amend(self, schema: dict[str, Any]) -> None:
        schema["additionalProperties"] = False


class JobResponseSerializer(JobSerializer):
    """Base of a type's job object in responses: every key it describes is always sent (the
    type's fields as its serializer renders them), so all are required, those with a model
    default too."""


class JobResponseExtension(AmendingExtension):
    """Describes a ``JobResponseSerializer`` with every property required."""

    target_class = JobResponseSerializer

    def amend(self, schema: dict[str, Any]) -> None:
        schema["required"] = sorted(schema.get("properties", {}))


def takes_extra_values(job_type: JobType) -> bool:
    """Whether ``POST /`` may accept keys the type's serializer does not know: only its own
    ``prepare_values`` can turn them into model fields."""
    return type(job_type).prepare_values is not JobType.prepare_values


def method_field_methods(
    serializer_class: type[serializers.Serializer[Any]],
    fields: Iterable[serializers.Field[Any, Any, Any, Any]],
) -> dict[str, Any]:
    """The methods of ``serializer_class`` that its ``SerializerMethodField``s among ``fields``
    call, by name: spectacular types such a field by its method's return annotation or
    ``@extend_schema_field``, looked up on the serializer the field is bound to."""
    methods: dict[str, Any] = {}
    for field in fields:
        if isinstance(field, serializers.SerializerMethodField):
            # Static lookup keeps a staticmethod or classmethod as the class declares it.
            method = inspect.getattr_static(serializer_class, field.method_name, None)
            if method is not None:
                methods[field.method_name] = method
    return methods


def _component(job_type: JobType, direction: str) -> type[serializers.Serializer[Any]]:
    """A plain serializer of one type's job object (``response``) or create body (``request``)."""
    type_serializer = type_serializer_class(job_type)
    key = (job_type.type, direction, type_serializer)
    if key not in _component_serializers:
        base_names = set(JobSerializer().fields)
        fields = {
            name: field
            for name, field in type_serializer().fields.items()
            if name not in base_names
            and not (direction == "request" and field.read_only)
            and not (direction == "response" and field.write_only)
        }
        attrs: dict[str, Any] = method_field_methods(type_serializer, fields.values())
        attrs.update({name: copy.deepcopy(field) for name, field in fields.items()})
        # A one-value enum, kept out of spectacular's enum components (they would collide).
        discriminator_class = extend_schema_field(
            {"type": "string", "allOf": [{"enum": [job_type.type]}]}
        )(type("TypeNameField", (serializers.CharField,), {}))
        if direction == "request":
            attrs["type"] = discriminator_class(help_text="The job type's name.")
            bases: tuple[type, ...] = (
                (serializers.Serializer,)
                if takes_extra_values(job_type)
                else (ClosedCreateSerializer,)
            )
            name = f"{camel(job_type.type)}JobCreateSerializer"
        else:
            attrs["type"] = discriminator_class(read_only=True, help_text="The job type's name.")
            bases = (JobResponseSerializer,)
            name = f"{camel(job_type.type)}JobSerializer"
        attrs["__module__"] = __name__
        # Spectacular finds the key type of a read-only related field (a many-to-many through a
        # model of the project's, say) through the model its serializer names, which it needs.
        attrs["Meta"] = type("Meta", (), {"model": job_type.model_class})
        _component_serializers[key] = type(name, bases, attrs)
    return _component_serializers[key]


def _polymorphic(component_name: str, direction: str, **kwargs: Any) -> PolymorphicProxySerializer:
    def per_type() -> dict[str, serializers.Serializer[Any] | type[serializers.Serializer[Any]]]:
        # A request creates a job: only of the types that let API clients do so.
        types = [t for t in job_type_registry if direction != "request" or t.api_create]
        return {t.type: _component(t, direction) for t in types}

    return PolymorphicProxySerializer(
        component_name=component_name,
        serializers=per_type,
        resource_type_field_name="type",
        **kwargs,
    )


ERROR = inline_serializer("JobApiError", fields={"detail": serializers.CharField()})
FIELD_ERRORS = OpenApiResponse(
    OpenApiTypes.OBJECT,
    description="Field errors in DRF's shape: field name (or non_field_errors) to messages.",
)
TOO_MANY = inline_serializer(
    "JobLimitReached",
    fields={
        "detail": serializers.CharField(),
        "code": serializers.ChoiceField(choices=["max_job_count_exceeded"]),
        "type": serializers.CharField(),
        "max_count": serializers.IntegerField(),
    },
)
UNAUTHENTICATED = {
    401: OpenApiResponse(ERROR, description="Not authenticated (token or basic auth)."),
    403: OpenApiResponse(ERROR, description="Not authenticated (session auth)."),
}
# Session authentication refuses a POST without the CSRF token with 403 as well.
UNAUTHENTICATED_OR_NO_CSRF = {
    **UNAUTHENTICATED,
    403: OpenApiResponse(
        ERROR,
        description="Not authenticated (session auth), or a session-authenticated POST "
        "without the CSRF token (by default the csrftoken cookie's value, as X-CSRFToken).",
    ),
}
NOT_FOUND = {404: OpenApiResponse(ERROR, description="No such job visible to the caller.")}
# DRF's content negotiation and parsers answer these before the view runs (in JSON).
NOT_ACCEPTABLE = {
    406: OpenApiResponse(
        ERROR, description="The Accept header names no media type the API renders."
    )
}
UNSUPPORTED_MEDIA_TYPE = {
    415: OpenApiResponse(
        ERROR,
        description="The body's Content-Type is none the API parses.",
    )
}


def list_parameters() -> list[OpenApiParameter]:
    states = sorted({str(s) for s in JobState} | {"live", "ended"})
    return [
        OpenApiParameter(
            "state",
            {"type": "array", "items": {"type": "string", "enum": states}},
            description="Only jobs in these states; repeat or separate with commas.",
            explode=True,
        ),
        OpenApiParameter(
            "type",
            {"type": "array", "items": {"type": "string", "enum": job_type_registry.names()}},
            # The enum is what a client can start and see described; a removed type's name
            # is only there for the jobs it left.
            description="Only jobs of these types; repeat or separate with commas. The name "
            "of a type no longer registered is accepted too while the caller has jobs of it.",
            explode=True,
        ),
    ]


class JobAutoSchema(AutoSchema):
    """Per-action requests and responses: the registry is only filled once Django is ready,
    so they are built when the schema is generated."""

    def _action(self) -> str:
        return str(getattr(self.view, "action", ""))

    def get_override_parameters(self) -> list[Any]:
        parameters = list(super().get_override_parameters())
        if self._action() == "list":
            parameters += list_parameters()
        return parameters

    def get_operation(
        self,
        path: str,
        path_regex: str,
        path_prefix: str,
        method: str,
        registry: ComponentRegistry,
    ) -> dict[str, Any] | None:
        operation: dict[str, Any] | None = super().get_operation(
            path, path_regex, path_prefix, method, registry
        )
        # Spectacular sees no required key in a oneOf, so it left the body optional; without
        # one the answer is 400 "type: This field is required.".
        if operation and self._action() == "create" and "requestBody" in operation:
            operation["requestBody"]["required"] = True
        if operation and self._action() == "retrieve":
            return JobDetailOperation(operation)
        return operation

    def get_operation_id(self) -> str:
        return operation_id(self._action())

    def is_excluded(self) -> bool:
        # With no type that API clients may start, there is no create request to describe.
        if self._action() == "create" and not any(t.api_create for t in job_type_registry):
            return True
        return bool(super().is_excluded())

    def get_tags(self) -> list[str]:
        return ["jobs"]

    def get_summary(self) -> str | None:
        return SUMMARIES.get(self._action())

    def get_request_serializer(self) -> Any:
        action = self._action()
        if action == "create":
            return _polymorphic("JobCreate", "request")
        if action == "cancel":
            return None
        return super().get_request_serializer()

    def get_response_serializers(self) -> Any:
        action = self._action()
        job = _polymorphic("Job", "response")
        if action == "list":
            return {
                200: _polymorphic("Job", "response", many=True),
                400: FIELD_ERRORS,
                **UNAUTHENTICATED,
                **NOT_ACCEPTABLE,
            }
        if action == "create":
            return {
                201: job,
                400: FIELD_ERRORS,
                **UNAUTHENTICATED_OR_NO_CSRF,
                **NOT_ACCEPTABLE,
                **UNSUPPORTED_MEDIA_TYPE,
                429: OpenApiResponse(TOO_MANY, description="The type's max_count is reached."),
            }
        # Cancel reads no body, so no Content-Type is refused there.
        if action == "retrieve":
            return {200: job, **UNAUTHENTICATED, **NOT_FOUND, **NOT_ACCEPTABLE}
        if action == "cancel":
            return {200: job, **UNAUTHENTICATED_OR_NO_CSRF, **NOT_FOUND, **NOT_ACCEPTABLE}
        return super().get_response_serializers()


def operation_id(action: str) -> str:
    """The id of the job API's operation for ``action`` (before ``CAMELIZE_NAMES``)."""
    return f"jobs_{action}"


class JobDetailOperation(dict[str, Any]):
    """The detail operation ``JobAutoSchema`` builds, which the event stream mirrors: a dict
    that says which view it describes, wherever that view is mounted and whatever id it ends
    up with. Spectacular turns it into a plain dict once the postprocessing hooks have run."""


SUMMARIES = {
    "list": "The caller's jobs, newest first",
    "create": "Create and start a job",
    "retrieve": "One job, live from the progress store",
    "cancel": "Cancel a job",
}


class JobViewSetExtension(OpenApiViewExtension):
    """Gives the job views a spectacular schema whatever DEFAULT_SCHEMA_CLASS says."""

    target_class = "task_ferry.api.views.JobViewSet"

    def view_replacement(self) -> type[Any]:
        target: Any = self.target_class
        return type(target.__name__, (target,), {"schema": JobAutoSchema()})


class JobSchemaGenerator(SchemaGenerator):
    """Describes the job endpoints only, at the paths they are mounted on."""

    def _get_paths_and_endpoints(self) -> list[tuple[str, str, str, Any]]:
        from task_ferry.api.views import JobViewSet

        endpoints: list[tuple[str, str, str, Any]] = super()._get_paths_and_endpoints()
        return [e for e in endpoints if isinstance(e[3], JobViewSet)]

    def parse(self, input_request: Any, public: bool) -> dict[str, Any]:
        # Here the detail operations are still ``JobDetailOperation``s.
        paths: dict[str, Any] = super().parse(input_request, public)
        add_events_operation(paths)
        return paths

    def get_schema(self, request: Any = None, public: bool = False) -> dict[str, Any]:
        schema: dict[str, Any] = super().get_schema(request, public)
        schema["info"]["title"] = schema["info"].get("title") or "Task ferry jobs API"
        schema["info"]["version"] = schema["info"].get("version") or "1"
        return schema


EVENTS_DESCRIPTION = (
    "A stream of `job` events, each carrying the job as the detail endpoint shows it, from its "
    "current state until it ends; an `end` event follows the last. Pushed through Redis pub/sub "
    "under ASGI; elsewhere answered once with a `retry` delay, so `EventSource` polls by "
    "reconnecting. See docs/api.md."
)
EVENTS_EXAMPLE = (
    'event: job\ndata: {"id":42,"state":"started","progress_percentage":40,...}\n\n'
    'event: job\ndata: {"id":42,"state":"finished","progress_percentage":100,...}\n\n'
    'event: end\ndata: {"state":"finished"}\n\n'
)


def events_postprocessing_hook(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """For a project-wide schema: add to ``SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]``
    (keeping spectacular's own ``postprocess_schema_enums``) to describe the event stream."""
    add_events_operation(result.get("paths", {}))
    return result


def add_events_operation(paths: dict[str, Any]) -> None:
    """Describe ``GET <id>/events/``, a plain Django view spectacular cannot see, next to each
    detail operation it mirrors (same parameters, security and error responses). The details
    are the ``JobDetailOperation``s, not the operations with their id (a project's own
    ``jobs/{id}/`` has it too) or at a path reversed from the URLconf (the API may be mounted
    inside a namespace of the project's, under a prefix with a ``version`` argument, or at a
    path that spectacular's ``SCHEMA_PATH_PREFIX_TRIM`` shortened)."""
    for path, item in list(paths.items()):
        detail = item.get("get")
        if not isinstance(detail, JobDetailOperation):
            continue
        # A plain dict, or a second run of the hook would give the stream a stream.
        events = copy.deepcopy(dict(detail))
        events["operationId"] = operation_id("events_retrieve")
        events["summary"] = "A job's changes as Server-Sent Events"
        events["description"] = EVENTS_DESCRIPTION
        # A plain Django view: it streams whatever the Accept header says.
        events["responses"].pop("406", None)
        events["responses"]["200"] = {
            "description": "The event stream (`text/event-stream`).",
            "content": {
                "text/event-stream": {"schema": {"type": "string"}, "example": EVENTS_EXAMPLE}
            },
        }
        events_path = f"{path}events/"
        if spectacular_settings.CAMELIZE_NAMES:
            # As spectacular names the detail: the id, and path parameters already camelized.
            events_path, events = camelize_operation(events_path, events)
        paths[events_path] = {"get": events}


class JobSchemaView(SpectacularAPIView):
    """``GET schema/``: the OpenAPI schema of the job API alone, for whom the API serves."""

    generator_class = JobSchemaGenerator

    def get_permissions(self) -> list[Any]:
        # No more public than the endpoints it describes; spectacular's SERVE_PERMISSIONS too.
        return [get_permission_class()(), *super().get_permissions()]
