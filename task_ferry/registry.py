"""Job types: what a job does, and the registry that finds a type by name, class or model.

A job type is a ``JobType`` subclass with a ``type`` name and a ``model_class``. Types defined in
an installed app's ``job_types`` module are registered when Django starts; calling
``job_type_registry.register()`` yourself (for example in ``AppConfig.ready()``) works too.
``JobType[ExportJob]`` tells a type checker the type's model, so its hooks take an ``ExportJob``
and ``JobHandler.create_and_start(user, ExportJobType, ...)`` returns one.
"""

from __future__ import annotations

import builtins
import inspect
import math
import threading
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from task_ferry.exceptions import (
    JobTypeAlreadyRegistered,
    JobTypeDoesNotExist,
    JobTypeNotRegistered,
    MultipleJobTypesForModel,
    NoJobTypeForModel,
    TaskFerryImproperlyConfigured,
)
from task_ferry.models import Job

if TYPE_CHECKING:
    from rest_framework.serializers import Serializer

    from task_ferry.progress import Progress

__all__ = ["JobType", "JobTypeRegistry", "job_type_registry"]

# The model of a job type's jobs. Its default, Any, is for type checkers alone, which bundle
# typing_extensions' stubs (typing.TypeVar takes no default before Python 3.13): a subclass of
# plain JobType, as the README writes one, is JobType[Any] even to mypy --strict, so its hooks
# may take the type's own model as before.
if TYPE_CHECKING:
    import typing_extensions
    from django.db.models import QuerySet

    JobModelT = typing_extensions.TypeVar("JobModelT", bound=Job, default=Any)
else:
    JobModelT = TypeVar("JobModelT", bound=Job)


class JobType(Generic[JobModelT]):
    """Subclass this to define a kind of job. Every hook has a no-op default.

    Subclass ``JobType[ExportJob]`` to have the type checker hold the hooks' ``job`` to an
    ``ExportJob``; plain ``JobType`` leaves them untyped.
    """

    #: Unique name the job is started by, e.g. ``"export_table"``.
    type: ClassVar[str] = ""
    #: The ``Job`` subclass that stores this type's jobs. (Not a ClassVar: a type checker
    #: allows no type variable in one.)
    model_class: builtins.type[JobModelT]
    #: Most pending or running jobs of this type one user may have; None means
    #: ``TASK_FERRY["MAX_JOBS_PER_USER_PER_TYPE"]``.
    max_count: ClassVar[int | None] = None
    #: Queue the executor sends this type's jobs to; None means the executor's default.
    queue: ClassVar[str | None] = None
    #: Priority passed to executors that support one (django.tasks: -100..100).
    priority: ClassVar[int] = 0
    #: Seconds a run may take: past them, its next progress tick raises
    #: ``JobTimeLimitExceeded`` and the job ends ``failed``. None: no limit. A run that stops
    #: ticking is not stopped (see docs/job-types.md, "Time limits").
    time_limit: ClassVar[float | None] = None
    #: Whether ``run()`` executes in one transaction that also holds the move to ``finished``:
    #: a failure or a cancel undoes its writes. False runs it in autocommit mode: each write
    #: commits at once and stays whatever the job's end (clean up in ``on_error`` and
    #: ``on_cancelled``), and no transaction stays open for the whole run.
    atomic: ClassVar[bool] = True
    #: DRF serializer of the type's own fields for the API; None derives one from model_class.
    serializer_class: ClassVar[builtins.type[Serializer[Any]] | None] = None
    #: Whether API clients may start jobs of this type (``POST /``). They may then set every
    #: writable field of the serializer: give the type a ``serializer_class`` that leaves out
    #: what the job writes itself, or make those fields ``editable=False``.
    api_create: ClassVar[bool] = False

    def prepare_values(self, values: dict[str, Any], user: Any) -> dict[str, Any]:
        """Validate and transform the values before the job row is created.

        Raise ``ValueError`` or Django's ``ValidationError`` to reject them. Return the model
        field values of the new job.
        """
        return values

    def after_job_creation(self, job: JobModelT, values: dict[str, Any]) -> None:
        """Called right after the job row is saved, before it is dispatched."""

    def run(self, job: JobModelT, progress: Progress) -> None:
        """Do the work. Runs in the executor, inside one database transaction (in autocommit
        mode with ``atomic = False``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(job, progress).")

    def on_error(self, job: JobModelT, exc: BaseException) -> None:
        """Called once after the job was marked failed, or after its run raised while its row
        was deleted (the row is gone: do not save ``job``)."""

    def on_cancelled(self, job: JobModelT) -> None:
        """Called once after the job was marked cancelled, or after its run was stopped (or
        returned) while its row was deleted (the row is gone: do not save ``job``). Clean up
        partial output here."""

    def before_delete(self, job: JobModelT) -> None:
        """Called before ``cleanup_old_jobs`` deletes this expired job."""

    def get_max_count(self) -> int | None:
        if self.max_count is not None:
            return self.max_count
        from task_ferry.conf import ferry_settings

        limit: int | None = ferry_settings.MAX_JOBS_PER_USER_PER_TYPE
        return limit

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.type!r}>"


def defined_in(cls: type, module: ModuleType) -> bool:
    """Whether ``cls`` belongs to ``module``: defined there or, for a package (a
    ``job_types/`` directory), in one of its submodules. A class imported from elsewhere does
    not."""
    return cls.__module__ == module.__name__ or (
        hasattr(module, "__path__") and cls.__module__.startswith(f"{module.__name__}.")
    )


def is_concrete_job_type(obj: object) -> bool:
    """A class that can be registered: a JobType subclass with a name and a model."""
    return (
        inspect.isclass(obj)
        and issubclass(obj, JobType)
        and obj is not JobType
        and bool(obj.type)
        and hasattr(obj, "model_class")
    )


# The hooks task_ferry calls, each as a plain function.
HOOKS = (
    "prepare_values",
    "after_job_creation",
    "run",
    "on_error",
    "on_cancelled",
    "before_delete",
)


def never_run_kind(function: object) -> str | None:
    """What ``function`` is if calling it runs none of its body (it returns a coroutine or a
    generator), as a message names it; None for a plain function."""
    if inspect.iscoroutinefunction(function):
        return "an `async def`"
    if inspect.isasyncgenfunction(function):
        return "an async generator (an `async def` with `yield`)"
    if inspect.isgeneratorfunction(function):
        return "a generator (it has a `yield`)"
    return None


def inherited_name(first: JobType[Any], second: JobType[Any]) -> str:
    """Why two types share a name when one subclasses the other without naming itself."""
    for parent, child in ((type(first), type(second)), (type(second), type(first))):
        if issubclass(child, parent) and "type" not in vars(child):
            return f": {child.__qualname__} inherits {parent.__qualname__}'s unless it sets its own"
    return ""


def duplicate_message(existing: JobType[Any], new: JobType[Any]) -> str:
    """Why ``new`` cannot be registered under the name ``existing`` holds, and what to do."""
    first, second = type(existing), type(new)
    named = f"Job type name {new.type!r} is claimed by both"
    if (
        first.__qualname__ == second.__qualname__
        and "<locals>" not in first.__qualname__
        and module_names_match(first.__module__, second.__module__)
    ):
        if first.__module__ == second.__module__:
            how = (
                f"module {first.__module__} was executed twice (reloaded, say), or defines "
                f"two classes of that name"
            )
        else:
            how = (
                f"one module was imported under two names, {first.__module__} and "
                f"{second.__module__} (a directory and its parent both on sys.path, say)"
            )
        return (
            f"{named} {first.__module__}.{first.__qualname__} and another class of that name: "
            f"{how}. Import and define it once; changing its `type` will not help."
        )
    return (
        f"{named} {first.__module__}.{first.__qualname__} and "
        f"{second.__module__}.{second.__qualname__}. Give one of them a different "
        f"`type`{inherited_name(existing, new)}."
    )


def module_names_match(first: str, second: str) -> bool:
    """Whether two module names can be one file imported twice: equal, or one a dotted tail
    of the other (``myapp.job_types`` and ``project.myapp.job_types``)."""
    shorter, longer = sorted((first, second), key=len)
    return longer == shorter or longer.endswith(f".{shorter}")


class JobTypeRegistry:
    def __init__(self) -> None:
        self._by_name: dict[str, JobType] = {}
        self._lock = threading.Lock()

    def register(
        self, job_type: JobType[JobModelT] | type[JobType[JobModelT]]
    ) -> JobType[JobModelT]:
        """Register a job type (an instance or the class). Registering the same class twice is
        harmless; a different class under a taken name raises ``JobTypeAlreadyRegistered``."""
        if inspect.isclass(job_type) and not issubclass(job_type, JobType):
            raise TaskFerryImproperlyConfigured(
                f"{job_type!r} is not a JobType. Subclass task_ferry.registry.JobType."
            )
        instance = job_type() if inspect.isclass(job_type) else job_type
        self._validate(instance)
        with self._lock:
            existing = self._by_name.get(instance.type)
            if existing is not None:
                if type(existing) is type(instance):
                    return existing
                raise JobTypeAlreadyRegistered(duplicate_message(existing, instance))
            self._by_name[instance.type] = instance
        return instance

    def unregister(self, job_type: str | JobType | type[JobType]) -> None:
        name = job_type if isinstance(job_type, str) else getattr(job_type, "type", None)
        with self._lock:
            if not isinstance(name, str) or name not in self._by_name:
                raise JobTypeDoesNotExist(
                    name if isinstance(name, str) else str(job_type), self._by_name
                )
            del self._by_name[name]

    def get(self, name: str) -> JobType:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise JobTypeDoesNotExist(name, self._by_name) from None

    def get_by_class(self, job_type_class: type[JobType[JobModelT]]) -> JobType[JobModelT]:
        """The registered instance of this class. A class that is not the one registered under
        its name (a subclass that inherits it, say) raises ``JobTypeNotRegistered``, a
        ``JobTypeDoesNotExist``."""
        name = getattr(job_type_class, "type", None)
        registered = self._by_name.get(name) if isinstance(name, str) else None
        if registered is not None and type(registered) is job_type_class:
            return registered
        raise JobTypeNotRegistered(
            job_type_class, self._by_name, None if registered is None else type(registered)
        )

    def get_named_or_class(self, job_type: str | type[JobType[Any]]) -> JobType[Any]:
        """``get()`` for a name, ``get_by_class()`` for a class: what ``JobHandler`` takes."""
        if isinstance(job_type, type):
            return self.get_by_class(job_type)
        return self.get(job_type)

    def get_by_model(self, model: type[Job] | Job) -> JobType:
        """The type of a job (an instance: its ``type`` decides, where it is registered) or of a
        job model (the one type whose ``model_class`` it is). Several types may share a model:
        for such a model, ``MultipleJobTypesForModel`` names them."""
        named = model.type if isinstance(model, Job) else ""
        if named in self._by_name:
            return self._by_name[named]
        model_class = model if inspect.isclass(model) else type(model)
        using = self.types_using(model_class)
        if len(using) == 1:
            return using[0]
        if named:
            raise JobTypeDoesNotExist(named, self._by_name)
        if using:
            raise MultipleJobTypesForModel(model_class, [job_type.type for job_type in using])
        raise NoJobTypeForModel(model_class, self._by_name)

    def types_using(self, model_class: builtins.type[Job]) -> list[JobType]:
        """The registered types whose ``model_class`` is ``model_class``."""
        return [t for t in self._by_name.values() if t.model_class is model_class]

    def all(self) -> list[JobType]:
        return list(self._by_name.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[JobType]:
        return iter(self.all())

    def register_module(self, module: ModuleType) -> list[JobType]:
        """Register every concrete JobType class defined in ``module`` itself (for a package,
        also those it imports from its own submodules)."""
        found = [
            obj
            for obj in vars(module).values()
            if is_concrete_job_type(obj) and defined_in(obj, module)
        ]
        return [self.register(cls) for cls in found]

    def autodiscover(self) -> None:
        """Import ``<app>.job_types`` for every installed app and register what it defines."""
        from importlib import import_module

        from django.apps import apps
        from django.utils.module_loading import module_has_submodule

        for app_config in apps.get_app_configs():
            if module_has_submodule(app_config.module, "job_types"):
                self.register_module(import_module(f"{app_config.name}.job_types"))

    @staticmethod
    def _validate(job_type: JobType) -> None:
        if not isinstance(job_type, JobType):
            raise TaskFerryImproperlyConfigured(
                f"{job_type!r} is not a JobType. Subclass task_ferry.registry.JobType."
            )
        if not job_type.type or not isinstance(job_type.type, str):
            raise TaskFerryImproperlyConfigured(
                f'{type(job_type).__qualname__} has no `type` name. Set `type = "..."`.'
            )
        max_length = Job._meta.get_field("type").max_length or 0
        if len(job_type.type) > max_length:
            raise TaskFerryImproperlyConfigured(
                f"{type(job_type).__qualname__}.type is {len(job_type.type)} characters long; "
                f"the most a job's type column holds is {max_length}."
            )
        model_class = getattr(job_type, "model_class", None)
        if not (inspect.isclass(model_class) and issubclass(model_class, Job)):
            raise TaskFerryImproperlyConfigured(
                f"{type(job_type).__qualname__}.model_class must be a subclass of "
                f"task_ferry.models.Job, got {model_class!r}."
            )
        if model_class._meta.abstract:
            raise TaskFerryImproperlyConfigured(
                f"{type(job_type).__qualname__}.model_class is {model_class.__qualname__}, an "
                f"abstract model: it has no table to store jobs in. Point model_class at a "
                f"concrete subclass of it."
            )
        time_limit = job_type.time_limit
        if time_limit is not None and (
            isinstance(time_limit, bool)
            or not isinstance(time_limit, int | float)
            or not 0 < time_limit < math.inf
        ):
            raise TaskFerryImproperlyConfigured(
                f"{type(job_type).__qualname__}.time_limit is {time_limit!r}; give the seconds a "
                f"run may take as a number above 0, or None for no limit."
            )
        if not isinstance(job_type.atomic, bool):
            raise TaskFerryImproperlyConfigured(
                f"{type(job_type).__qualname__}.atomic is {job_type.atomic!r}; set it to True "
                f"(run() in one transaction, the default) or False (autocommit)."
            )
        for hook in HOOKS:
            kind = never_run_kind(getattr(job_type, hook))
            if kind is not None:
                raise TaskFerryImproperlyConfigured(
                    f"{type(job_type).__qualname__}.{hook} is {kind}: task_ferry calls its "
                    f"hooks as plain functions, so its body would never run. Make it a plain "
                    f"`def` (call async code in it with asgiref's async_to_sync)."
                )

    def unknown_names(self, names: Iterable[str], jobs: QuerySet[Job]) -> list[str]:
        """Those of ``names`` that are neither registered nor the type of any of ``jobs``. A
        type removed from the code keeps its jobs, which are still found by its name; a
        misspelt name is unknown. One query, for names that are not registered only; text no
        row can hold (a NUL, which PostgreSQL refuses in a query too) is unknown without one."""
        from task_ferry.snapshot import storable

        not_registered = [name for name in names if name not in self]
        queried = [name for name in not_registered if storable(name) == name]
        with_jobs: set[str] = set()
        if queried:
            with_jobs = set(
                jobs.filter(type__in=queried).order_by().values_list("type", flat=True).distinct()
            )
        return [name for name in not_registered if name not in with_jobs]


job_type_registry = JobTypeRegistry()
