"""System checks. Ids are stable; docs/checks.md lists them all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Error, register

from task_ferry.conf import DEFAULTS, ferry_settings


@register()
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    unknown = sorted(set(ferry_settings.user_settings) - set(DEFAULTS))
    if unknown:
        messages.append(
            Error(
                f"TASK_FERRY has unknown key(s): {', '.join(unknown)}.",
                hint=f"Valid keys are: {', '.join(sorted(DEFAULTS))}.",
                id="task_ferry.E002",
            )
        )
    for name, minimum in (
        ("PROGRESS_CACHE_TIMEOUT", 1),
        ("JOB_EXPIRY_DAYS", 0),
        ("PUBLISH_INTERVAL", 0.001),
        ("HEARTBEAT_INTERVAL", 0.1),
        ("HEARTBEAT_TIMEOUT", 1),
    ):
        value = getattr(ferry_settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            messages.append(
                Error(
                    f"TASK_FERRY[{name!r}] must be a number >= {minimum}, got {value!r}.",
                    hint=f"Remove it to use the default, {DEFAULTS[name]!r}.",
                    id="task_ferry.E003",
                )
            )
    limit = ferry_settings.MAX_JOBS_PER_USER_PER_TYPE
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        messages.append(
            Error(
                f"TASK_FERRY['MAX_JOBS_PER_USER_PER_TYPE'] must be a positive int or None, "
                f"got {limit!r}.",
                hint="Use None for no limit.",
                id="task_ferry.E004",
            )
        )
    if ferry_settings.HEARTBEAT_TIMEOUT <= ferry_settings.HEARTBEAT_INTERVAL:
        messages.append(
            Error(
                "TASK_FERRY['HEARTBEAT_TIMEOUT'] must be larger than HEARTBEAT_INTERVAL, or "
                "every running job would look lost.",
                hint="Make HEARTBEAT_TIMEOUT at least three times HEARTBEAT_INTERVAL.",
                id="task_ferry.E005",
            )
        )
    return messages


@register()
def check_executor(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    from task_ferry.executors.base import check_executor as run_check

    return run_check()


@register()
def check_store(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    from django.utils.module_loading import import_string

    from task_ferry.stores.base import default_store_path, get_store

    try:
        import_string(default_store_path())
    except ImportError as exc:
        return [
            Error(
                f"The progress store {default_store_path()!r} cannot be imported: {exc}.",
                hint="Fix TASK_FERRY['PROGRESS_STORE'] or remove it.",
                id="task_ferry.E006",
            )
        ]
    return get_store().check()


@register()
def check_job_types(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    from task_ferry.registry import job_type_registry

    messages: list[CheckMessage] = []
    for job_type in job_type_registry.all():
        if job_type.max_count is not None and (
            not isinstance(job_type.max_count, int) or job_type.max_count < 1
        ):
            messages.append(
                Error(
                    f"{type(job_type).__qualname__}.max_count must be a positive int or None.",
                    hint="Use None to fall back to TASK_FERRY['MAX_JOBS_PER_USER_PER_TYPE'].",
                    obj=type(job_type),
                    id="task_ferry.E007",
                )
            )
    return messages
