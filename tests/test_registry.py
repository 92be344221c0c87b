import importlib
import math
import re
import sys
import types

import pytest
from django.db import models

from task_ferry.exceptions import (
    JobTypeAlreadyRegistered,
    JobTypeDoesNotExist,
    JobTypeNotRegistered,
    MultipleJobTypesForModel,
    NoJobTypeForModel,
    TaskFerryImproperlyConfigured,
)
from task_ferry.models import Job
from task_ferry.registry import JobType, JobTypeRegistry, job_type_registry
from tests.myapp.job_types import ExportJobType
from tests.myapp.models import ExportJob
from tests.testapp.job_types import (
    LimitedJobType,
    RecordingJobType,
    RoutedJobType,
    ScriptedJobType,
)
from tests.testapp.models import LimitedJob, ScriptedJob


class AbstractReportJob(Job):
    """A base for job models: abstract, so it has no table."""

    title = models.CharField(max_length=100)

    class Meta:
        abstract = True
        app_label = "testapp"


def test_job_types_modules_are_discovered_at_startup():
    # tests.testapp registers nothing by hand: its job_types module was found and loaded.
    assert isinstance(job_type_registry.get("scripted"), ScriptedJobType)
    assert isinstance(job_type_registry.get("routed"), RoutedJobType)
    assert isinstance(job_type_registry.get("limited"), LimitedJobType)


def test_a_type_that_names_its_model_through_a_generic_base_is_discovered():
    # LimitedJobType(RecordingJobType[LimitedJob]), RecordingJobType(JobType[RecordedJobT]).
    assert LimitedJobType.__orig_bases__ == (RecordingJobType[LimitedJob],)
    assert type(job_type_registry.get("limited")) is LimitedJobType
    assert job_type_registry.get_by_model(LimitedJob).model_class is LimitedJob


def test_get_by_class_returns_the_registered_instance():
    assert job_type_registry.get_by_class(LimitedJobType) is job_type_registry.get("limited")
    assert job_type_registry.get_by_class(ExportJobType) is job_type_registry.get("export_table")


class UnnamedScriptedJobType(ScriptedJobType):
    """Inherits ScriptedJobType's name, under which its parent is registered."""


class UnregisteredJobType(JobType[LimitedJob]):
    type = "unregistered"
    model_class = LimitedJob


@pytest.mark.parametrize(
    "job_type_class, message",
    [
        (
            UnnamedScriptedJobType,
            "tests.test_registry.UnnamedScriptedJobType is not a registered job type: its name "
            "'scripted' is tests.testapp.job_types.ScriptedJobType's. Known job types: "
            "'limited', 'scripted'. Give UnnamedScriptedJobType a `type` of its own (a subclass "
            "inherits its parent's), or pass ScriptedJobType.",
        ),
        (
            UnregisteredJobType,
            "tests.test_registry.UnregisteredJobType is not a registered job type: nothing is "
            "registered under its name 'unregistered'. Known job types: 'limited', 'scripted'. "
            "Define it in the job_types module of an app in INSTALLED_APPS (<app>/job_types.py), "
            "imported at startup, or register it with "
            "job_type_registry.register(UnregisteredJobType).",
        ),
        (
            RecordingJobType,
            "tests.testapp.job_types.RecordingJobType is not a registered job type: it has no "
            "`type` name. Known job types: 'limited', 'scripted'. Pass a JobType subclass with a "
            "`type` name and a `model_class`.",
        ),
    ],
)
def test_get_by_class_of_a_class_not_registered_says_what_to_do(job_type_class, message):
    registry = JobTypeRegistry()
    registry.register(ScriptedJobType)
    registry.register(LimitedJobType)
    with pytest.raises(JobTypeNotRegistered) as info:
        registry.get_by_class(job_type_class)
    assert str(info.value) == message
    # Caught where an unknown name is.
    assert isinstance(info.value, JobTypeDoesNotExist)
    assert info.value.known == ["limited", "scripted"]


def test_abstract_intermediate_classes_are_not_registered():
    assert "" not in job_type_registry
    assert all(jt.type for jt in job_type_registry.all())


def test_spec_explicit_register_next_to_discovery_is_harmless():
    existing = job_type_registry.get("export_table")
    assert job_type_registry.register(ExportJobType()) is existing
    assert job_type_registry.register(ExportJobType) is existing
    assert [jt.type for jt in job_type_registry.all()].count("export_table") == 1


def test_two_classes_under_one_name_is_a_clear_error():
    class Impostor(JobType):
        type = "export_table"
        model_class = ExportJob

    with pytest.raises(JobTypeAlreadyRegistered, match="export_table.*Impostor"):
        job_type_registry.register(Impostor())
    assert isinstance(job_type_registry.get("export_table"), ExportJobType)


def test_a_subclass_inheriting_its_parents_name_stops_startup_with_a_clear_error():
    # What autodiscovery does with a job_types module: Django's startup fails, no check runs.
    module = types.ModuleType("someapp.job_types")

    class ExportJobType(JobType):
        type = "export"
        model_class = ExportJob

    class CsvExportJobType(ExportJobType):
        pass

    for cls in (ExportJobType, CsvExportJobType):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    with pytest.raises(JobTypeAlreadyRegistered) as info:
        JobTypeRegistry().register_module(module)
    assert str(info.value) == (
        "Job type name 'export' is claimed by both someapp.job_types.ExportJobType and "
        "someapp.job_types.CsvExportJobType. Give one of them a different `type`: "
        "CsvExportJobType inherits ExportJobType's unless it sets its own."
    )


def test_get_unknown_lists_the_known_types():
    with pytest.raises(JobTypeDoesNotExist) as info:
        job_type_registry.get("exprot_table")
    assert "'exprot_table'" in str(info.value)
    assert "'export_table'" in str(info.value)
    assert "export_table" in info.value.known
    assert str(info.value).endswith(
        "Job types are registered from the job_types module of each app in INSTALLED_APPS "
        "(<app>/job_types.py, or the __init__.py of a job_types package), imported at startup."
    )


def test_get_by_model_accepts_class_and_instance():
    assert isinstance(job_type_registry.get_by_model(LimitedJob), LimitedJobType)
    assert isinstance(job_type_registry.get_by_model(LimitedJob(type="limited")), LimitedJobType)
    with pytest.raises(NoJobTypeForModel) as info:
        job_type_registry.get_by_model(models.Model)
    assert isinstance(info.value, JobTypeDoesNotExist)
    assert str(info.value).startswith("No registered job type uses the model Model. Known job ")


def test_get_by_model_of_a_model_several_types_share_goes_by_the_jobs_type():
    # scripted, routed, time_limited and autocommit all keep their jobs in ScriptedJob: the
    # first of them was the answer for any of their jobs.
    routed = job_type_registry.get_by_model(ScriptedJob(type="routed"))
    assert isinstance(routed, RoutedJobType)
    with pytest.raises(MultipleJobTypesForModel) as info:
        job_type_registry.get_by_model(ScriptedJob)
    assert str(info.value) == (
        "Several job types use the model ScriptedJob: 'autocommit', 'routed', 'scripted', "
        "'time_limited'. Name the type (job_type_registry.get(name), or type=... on a job "
        "created through the ORM), or pass a job whose type is set."
    )
    # A job whose type is no longer registered: its model's one type, else its name.
    assert isinstance(job_type_registry.get_by_model(LimitedJob(type="gone")), LimitedJobType)
    with pytest.raises(JobTypeDoesNotExist, match="^No job type named 'gone'"):
        job_type_registry.get_by_model(ScriptedJob(type="gone"))


def test_register_and_unregister_on_a_fresh_registry():
    registry = JobTypeRegistry()
    registry.register(LimitedJobType())
    assert registry.names() == ["limited"]
    registry.unregister("limited")
    assert registry.all() == []
    with pytest.raises(JobTypeDoesNotExist):
        registry.unregister("limited")


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"type": "", "model_class": LimitedJob}, "no `type` name"),
        ({"type": "x", "model_class": int}, "must be a subclass of task_ferry.models.Job"),
        ({"type": "x"}, "must be a subclass of task_ferry.models.Job"),
        *(
            (
                {"type": "x", "model_class": LimitedJob, "time_limit": time_limit},
                f"Bad.time_limit is {time_limit!r}; give the seconds a run may take as a number "
                f"above 0, or None for no limit.",
            )
            for time_limit in (0, -1, "10", True, math.inf, math.nan)
        ),
        *(
            (
                {"type": "x", "model_class": LimitedJob, "atomic": atomic},
                f"Bad.atomic is {atomic!r}; set it to True (run() in one transaction, the "
                f"default) or False (autocommit).",
            )
            for atomic in (None, 0, "no")
        ),
    ],
)
def test_invalid_job_types_are_rejected(attrs, message):
    bad = type("Bad", (JobType,), attrs)
    registry = JobTypeRegistry()
    with pytest.raises(TaskFerryImproperlyConfigured, match=re.escape(message)):
        registry.register(bad())
    assert registry.names() == []


def test_an_abstract_model_is_refused_at_registration():
    bad = type("ReportJobType", (JobType,), {"type": "report", "model_class": AbstractReportJob})
    # It was registered, and creating a job raised Django's "Abstract models cannot be
    # instantiated." deep inside JobHandler.
    with pytest.raises(TaskFerryImproperlyConfigured, match="AbstractReportJob, an abstract model"):
        JobTypeRegistry().register(bad)


async def async_hook(self, *args):
    pass


def generator_hook(self, *args):
    yield


async def async_generator_hook(self, *args):
    yield


@pytest.mark.parametrize(
    "hook",
    ["prepare_values", "after_job_creation", "run", "on_error", "on_cancelled", "before_delete"],
)
@pytest.mark.parametrize(
    "function, kind",
    [
        (async_hook, "an `async def`"),
        (generator_hook, "a generator"),
        (async_generator_hook, "an async generator"),
    ],
)
def test_a_hook_whose_body_would_never_run_is_refused_at_registration(hook, function, kind):
    # Called as a plain function, it returns a coroutine or a generator: an async run() left the
    # job "finished" with none of its work done, an async on_error() never ran.
    bad = type("AsyncJobType", (JobType,), {"type": "x", "model_class": LimitedJob, hook: function})
    with pytest.raises(TaskFerryImproperlyConfigured) as info:
        JobTypeRegistry().register(bad)
    assert str(info.value).startswith(f"AsyncJobType.{hook} is {kind}")
    assert "Make it a plain `def`" in str(info.value)


@pytest.fixture
def job_types_file(tmp_path, monkeypatch):
    """A ``job_types`` module importable as ``twiceapp.job_types`` and, as when a project's
    directory and its parent are both on sys.path, as ``job_types``."""
    package = tmp_path / "twiceapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "job_types.py").write_text(
        "from task_ferry.registry import JobType\n"
        "from tests.testapp.models import LimitedJob\n\n\n"
        "class TwiceJobType(JobType):\n"
        "    type = 'twice'\n"
        "    model_class = LimitedJob\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(package))
    yield
    for name in ("twiceapp", "twiceapp.job_types", "job_types"):
        sys.modules.pop(name, None)


def test_a_module_imported_under_two_names_is_named_as_the_cause(job_types_file):
    registry = JobTypeRegistry()
    registry.register_module(importlib.import_module("twiceapp.job_types"))
    with pytest.raises(JobTypeAlreadyRegistered) as info:
        registry.register_module(importlib.import_module("job_types"))
    # It said "Give one of them a different `type`", of one class.
    assert str(info.value) == (
        "Job type name 'twice' is claimed by both twiceapp.job_types.TwiceJobType and another "
        "class of that name: one module was imported under two names, twiceapp.job_types and "
        "job_types (a directory and its parent both on sys.path, say). Import and define it "
        "once; changing its `type` will not help."
    )


def test_a_module_executed_twice_is_named_as_the_cause(job_types_file):
    registry = JobTypeRegistry()
    module = importlib.import_module("twiceapp.job_types")
    registry.register_module(module)
    with pytest.raises(
        JobTypeAlreadyRegistered, match="module twiceapp.job_types was executed twice"
    ):
        registry.register_module(importlib.reload(module))


def test_a_job_types_package_registers_the_types_of_its_own_modules(tmp_path, monkeypatch):
    package = tmp_path / "packagedapp" / "job_types"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text(
        "from tests.testapp.job_types import LimitedJobType  # not this package's own\n"
        "from .reports import ReportJobType\n"
    )
    (package / "reports.py").write_text(
        "from task_ferry.registry import JobType\n"
        "from tests.testapp.models import LimitedJob\n\n\n"
        "class ReportJobType(JobType):\n"
        "    type = 'packaged_report'\n"
        "    model_class = LimitedJob\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("packagedapp.job_types")
        # It registered nothing: the class is defined in packagedapp.job_types.reports.
        registered = JobTypeRegistry().register_module(module)
    finally:
        for name in ("packagedapp", "packagedapp.job_types", "packagedapp.job_types.reports"):
            sys.modules.pop(name, None)
    assert [jt.type for jt in registered] == ["packaged_report"]


def test_register_module_takes_only_classes_defined_there():
    module = types.ModuleType("fake_job_types")

    class Local(JobType):
        type = "local"
        model_class = LimitedJob

    Local.__module__ = module.__name__
    module.Local = Local
    module.Imported = LimitedJobType  # imported from elsewhere: not this module's to register
    registry = JobTypeRegistry()
    assert [jt.type for jt in registry.register_module(module)] == ["local"]
