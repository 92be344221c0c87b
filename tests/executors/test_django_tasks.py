"""DjangoTasksExecutor without a worker: system checks, dispatch on commit, queue and priority,
and what happens when the backend cannot take the task."""

import datetime
import sys
import types
from importlib.util import find_spec

import pytest
from django.core.checks import run_checks
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from task_ferry.checks import refuse_misplaced_tasks_backend
from task_ferry.exceptions import DispatchError, TaskFerryImproperlyConfigured
from task_ferry.executors import django_tasks
from task_ferry.executors.base import get_executor
from task_ferry.executors.django_tasks import DjangoTasksExecutor
from task_ferry.handler import JobHandler
from task_ferry.models import Job, JobState
from task_ferry.registry import job_type_registry
from task_ferry.snapshot import ERROR_TEXT_MAX_LENGTH
from tests.jobs import make_job, started_job
from tests.projects import manage_py_check, run_python
from tests.testapp.job_types import RoutedJobType
from tests.testapp.models import HookCall, Marker, ScriptedJob

EXECUTOR = "task_ferry.executors.django_tasks.DjangoTasksExecutor"
DATABASE_BACKEND = "django_tasks_db.DatabaseBackend"


def check_ids(messages):
    return sorted(m.id for m in messages)


def test_missing_tasks_api_is_reported_and_refuses_jobs(monkeypatch):
    # Both import paths fail the way an uninstalled package does.
    monkeypatch.setitem(sys.modules, "django.tasks", None)
    monkeypatch.setitem(sys.modules, "django_tasks", None)
    api, base = django_tasks._load_tasks_api()
    assert (api, base) == (None, None)
    monkeypatch.setattr(django_tasks, "tasks_api", api)
    monkeypatch.setattr(django_tasks, "tasks_base", base)

    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E020"
    assert "django-task-ferry[django-tasks]" in error.hint
    with pytest.raises(TaskFerryImproperlyConfigured, match="neither can be imported"):
        DjangoTasksExecutor().enqueue(1)


requires_tasks = pytest.mark.skipif(
    django_tasks.tasks_api is None, reason="neither django.tasks nor django-tasks is installed"
)


@pytest.fixture
def alias(settings):
    return settings.TASK_FERRY["TASKS_BACKEND"]


@pytest.fixture
def backends():
    """Dotted paths of the built-in backends of whichever django.tasks is installed."""
    prefix = f"{django_tasks.tasks_api.__name__}.backends"
    return {
        "immediate": f"{prefix}.immediate.ImmediateBackend",
        "dummy": f"{prefix}.dummy.DummyBackend",
    }


@pytest.fixture
def use_executor(settings):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "EXECUTOR": EXECUTOR}


OBSOLETE_BACKEND = "django_tasks.backends.database.DatabaseBackend"
# The path a Django 6 project guesses from the old one: django.tasks has no database backend.
GUESSED_BACKEND = "django.tasks.backends.database.DatabaseBackend"
MISPLACED_BACKENDS = pytest.mark.parametrize("misplaced", [OBSOLETE_BACKEND, GUESSED_BACKEND])


@requires_tasks
@MISPLACED_BACKENDS
def test_misplaced_database_backend_path_has_a_hint(settings, alias, misplaced):
    settings.TASKS = {alias: {"BACKEND": misplaced}}
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E022"
    assert repr(misplaced) in error.msg
    assert DATABASE_BACKEND in error.hint
    assert "INSTALLED_APPS" in error.hint and "db_worker" in error.hint


@requires_tasks
def test_guessed_database_backend_path_says_django_has_none(settings, alias):
    settings.TASKS = {alias: {"BACKEND": GUESSED_BACKEND}}
    [error] = DjangoTasksExecutor().check()
    assert "django.tasks has no database backend" in error.msg
    assert "django-tasks-db package" in error.msg


HAS_BUILTIN_TASKS = find_spec("django.tasks") is not None


@requires_tasks
@pytest.mark.skipif(find_spec("django_tasks_db") is None, reason="django-tasks-db is not installed")
@MISPLACED_BACKENDS
@pytest.mark.parametrize(
    "with_backport_app",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                find_spec("django_tasks") is None,
                reason="the django-tasks backport is not installed",
            ),
        ),
    ],
)
def test_manage_py_check_names_the_fix_of_a_misplaced_database_backend(
    tmp_path, with_backport_app, misplaced
):
    # A project that followed an older guide: the database backend where django-tasks kept
    # it. django.tasks' own check (Django 6's, or the backport's as an installed app) raised
    # InvalidTaskBackend on it before E022 could be shown: "No module named 'django_tasks'"
    # at the end of a traceback.
    installed = ["django.contrib.contenttypes", "django.contrib.auth", "rest_framework"]
    installed += ["task_ferry", *(["django_tasks"] if with_backport_app else []), "django_tasks_db"]
    project_settings = {
        "SECRET_KEY": "tests-only",
        "USE_TZ": True,
        "INSTALLED_APPS": installed,
        "DATABASES": {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path / "db.sqlite3"),
            }
        },
        "TASKS": {"default": {"BACKEND": misplaced}},
        "TASK_FERRY": {"EXECUTOR": EXECUTOR, "TASKS_BACKEND": "default", "REDIS_URL": None},
    }
    returncode, output = manage_py_check(tmp_path, project_settings)
    assert returncode != 0
    assert "InvalidTaskBackend" not in output
    assert f"(task_ferry.E022) TASKS['default']['BACKEND'] is {misplaced!r}" in output
    assert f'Use "BACKEND": "{DATABASE_BACKEND}"' in output
    if HAS_BUILTIN_TASKS or with_backport_app:
        # Stopped at startup, before any check could run.
        assert "TaskFerryImproperlyConfigured: (task_ferry.E022)" in output
    else:
        # Django 5.2 without the backport's app: nothing stops the checks, E022 is one of them.
        assert "TaskFerryImproperlyConfigured" not in output
        assert "System check identified" in output


@requires_tasks
@MISPLACED_BACKENDS
def test_startup_refuses_a_misplaced_database_backend_where_it_does_not_import(settings, misplaced):
    settings.TASKS = {
        "default": {"BACKEND": DATABASE_BACKEND},
        "old": {"BACKEND": misplaced},
    }
    if not HAS_BUILTIN_TASKS:
        assert "django_tasks" in settings.INSTALLED_APPS  # the backport's check is registered
    with pytest.raises(TaskFerryImproperlyConfigured) as raised:
        refuse_misplaced_tasks_backend()
    assert str(raised.value).startswith("(task_ferry.E022) TASKS['old']['BACKEND'] is ")
    assert f'HINT: Use "BACKEND": "{DATABASE_BACKEND}"' in str(raised.value)


@requires_tasks
def test_startup_takes_the_old_path_where_it_still_imports(settings, monkeypatch):
    # An old django-tasks that still has it: it works, so there is nothing to refuse.
    module = types.ModuleType("django_tasks.backends.database")
    module.DatabaseBackend = object
    monkeypatch.setitem(sys.modules, "django_tasks.backends.database", module)
    settings.TASKS = {"default": {"BACKEND": OBSOLETE_BACKEND}}
    refuse_misplaced_tasks_backend()


@pytest.mark.parametrize(
    "tasks",
    [
        {"default": {"BACKEND": DATABASE_BACKEND}},
        [{"BACKEND": OBSOLETE_BACKEND}],  # E021's to report
        {"default": OBSOLETE_BACKEND},
    ],
)
def test_startup_leaves_other_tasks_settings_to_the_checks(settings, tasks):
    settings.TASKS = tasks
    refuse_misplaced_tasks_backend()


@requires_tasks
def test_missing_alias_is_no_usable_backend(settings, alias):
    settings.TASKS = {"other": {"BACKEND": DATABASE_BACKEND}}
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E021"
    assert repr(alias) in error.msg
    assert DATABASE_BACKEND in error.hint


@requires_tasks
def test_tasks_written_as_a_list_is_named_not_a_crash(settings, alias):
    settings.TASKS = [{"BACKEND": DATABASE_BACKEND}]
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E021"
    assert "TASKS must be a dict of backends by alias, not a list" in error.msg
    assert f'TASKS = {{"{alias}": {{"BACKEND": "{DATABASE_BACKEND}"}}}}' in error.hint


@requires_tasks
def test_backend_that_does_not_import_is_no_usable_backend(settings, alias):
    settings.TASKS = {alias: {"BACKEND": "myproject.tasks.NoSuchBackend"}}
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E021"
    assert "myproject.tasks.NoSuchBackend" in error.msg


@requires_tasks
def test_the_database_backend_not_installed_says_to_install_it(settings, alias, monkeypatch):
    # Django 6 without the extra: django.tasks is there, django-tasks-db is not.
    monkeypatch.setitem(sys.modules, "django_tasks_db", None)
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND}}
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E021"
    assert "django-task-ferry[django-tasks]" in error.hint
    assert "INSTALLED_APPS" in error.hint


@requires_tasks
def test_the_database_backend_installed_but_misconfigured_is_not_told_to_install_it(
    settings, alias
):
    # django-tasks-db is installed; the project's own OPTIONS name an id_function that does not
    # import.
    settings.TASKS = {
        alias: {"BACKEND": DATABASE_BACKEND, "OPTIONS": {"id_function": "myproject.ids.no_such"}}
    }
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E021"
    assert "myproject" in error.msg
    assert "pip install" not in error.hint


@requires_tasks
def test_immediate_backend_warns_that_jobs_do_not_reach_a_worker(settings, alias, backends):
    settings.TASKS = {alias: {"BACKEND": backends["immediate"], "QUEUES": []}}
    [warning] = DjangoTasksExecutor().check()
    assert warning.id == "task_ferry.W023"
    assert "not in a worker" in warning.msg


@requires_tasks
def test_dummy_backend_warns_that_jobs_never_run(settings, alias, backends):
    settings.TASKS = {alias: {"BACKEND": backends["dummy"], "QUEUES": []}}
    [warning] = DjangoTasksExecutor().check()
    assert warning.id == "task_ferry.W024"
    assert "never runs them" in warning.msg


@requires_tasks
def test_queue_the_backend_does_not_allow(settings, alias):
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND, "QUEUES": ["default"]}}
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E025"
    assert error.obj is RoutedJobType
    assert "'special'" in error.msg and "QUEUES" in error.hint


@requires_tasks
def test_queues_given_as_a_string_says_to_make_it_a_list(settings, alias):
    # set("special") is one queue per character, so the type's queue is refused.
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND, "QUEUES": "special"}}
    errors = [m for m in DjangoTasksExecutor().check() if m.obj is RoutedJobType]
    [error] = errors
    assert error.id == "task_ferry.E025"
    assert "is the string 'special'" in error.hint
    assert "make it a list, e.g. ['special']" in error.hint


@requires_tasks
def test_priority_outside_the_django_tasks_range(alias, monkeypatch):
    monkeypatch.setattr(RoutedJobType, "priority", 500)
    [error] = DjangoTasksExecutor().check()
    assert error.id == "task_ferry.E028"
    assert error.obj is RoutedJobType


@requires_tasks
def test_priority_on_a_backend_without_priorities_warns(settings, alias, monkeypatch):
    settings.TASKS = {
        alias: {"BACKEND": "tests.executors.backends.NoPriorityBackend", "QUEUES": []}
    }
    monkeypatch.setattr(RoutedJobType, "priority", 5)
    # W024 too: the backend is a DummyBackend underneath.
    messages = {m.id: m for m in DjangoTasksExecutor().check()}
    assert sorted(messages) == ["task_ferry.W024", "task_ferry.W026"]
    assert messages["task_ferry.W026"].obj is RoutedJobType
    assert "ignored" in messages["task_ferry.W026"].msg


@requires_tasks
def test_database_backend_without_its_app(settings):
    settings.INSTALLED_APPS = [a for a in settings.INSTALLED_APPS if a != "django_tasks_db"]
    ids = check_ids(DjangoTasksExecutor().check())
    assert ids == ["task_ferry.E027"]


@requires_tasks
def test_the_test_settings_pass_and_checks_run_through_django(settings, use_executor, alias):
    assert DjangoTasksExecutor().check() == []
    # (A BACKEND that does not import makes django.tasks' own check raise before ours.)
    settings.TASKS = {"other": {"BACKEND": DATABASE_BACKEND}}
    # No database, as tests/test_checks.py runs them: Django 6.1 queried SQLite otherwise.
    ids = {m.id for m in run_checks(databases=[]) if m.id.startswith("task_ferry.")}
    assert "task_ferry.E021" in ids


@requires_tasks
@pytest.mark.parametrize("configured", [["default"], {"default": 1}, None, ""])
def test_a_tasks_backend_that_is_no_alias_is_named_not_a_crash(settings, use_executor, configured):
    # A list or a dict was used as a key of TASKS: TypeError out of `check` and `migrate`.
    settings.TASK_FERRY = {**settings.TASK_FERRY, "TASKS_BACKEND": configured}
    [error] = [m for m in run_checks(databases=[]) if m.id.startswith("task_ferry.E02")]
    assert error.id == "task_ferry.E021"
    assert error.msg == (
        f"TASK_FERRY['TASKS_BACKEND'] must be the alias of a backend in TASKS, a string; it is "
        f"{configured!r}."
    )
    assert (
        error.hint == f'Set it to one of {sorted(settings.TASKS)}, or leave it out for "default".'
    )


@pytest.fixture
def DBTaskResult():
    return pytest.importorskip("django_tasks_db.models").DBTaskResult


@requires_tasks
def test_dispatch_waits_for_commit(transactional_db, user, use_executor, alias, DBTaskResult):
    with transaction.atomic():
        job = JobHandler.create_and_start(user, "scripted", steps=3)
        assert not DBTaskResult.objects.exists()
    task = DBTaskResult.objects.get()
    assert task.task_path == "task_ferry.executors.django_tasks.run_job"
    assert task.args_kwargs == {"args": [job.pk, "scripted"], "kwargs": {}}
    assert task.backend_name == alias
    assert task.queue_name == "default"
    assert Job.objects.get(pk=job.pk).state == "pending"


@requires_tasks
def test_dispatch_is_one_insert_into_the_task_table(
    db,
    user,
    use_executor,
    DBTaskResult,
    django_assert_num_queries,
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks(execute=False):
        job = JobHandler.create_and_start(user, "scripted")
    with django_assert_num_queries(1) as captured:
        get_executor().dispatch(job.pk, "scripted")
    assert DBTaskResult._meta.db_table in captured.captured_queries[0]["sql"]


@requires_tasks
def test_rolled_back_create_dispatches_nothing(transactional_db, user, use_executor, DBTaskResult):
    with pytest.raises(RuntimeError, match="roll back"), transaction.atomic():
        JobHandler.create_and_start(user, "scripted")
        raise RuntimeError("roll back")
    assert not Job.objects.exists()
    assert not DBTaskResult.objects.exists()


@requires_tasks
def test_type_queue_and_priority_reach_the_backend(
    transactional_db, user, use_executor, monkeypatch, DBTaskResult
):
    monkeypatch.setattr(RoutedJobType, "priority", 7)
    routed = JobHandler.create_and_start(user, "routed")
    plain = JobHandler.create_and_start(user, "scripted")
    rows = {r.args_kwargs["args"][0]: r for r in DBTaskResult.objects.all()}
    assert (rows[routed.pk].queue_name, rows[routed.pk].priority) == ("special", 7)
    assert (rows[plain.pk].queue_name, rows[plain.pk].priority) == ("default", 0)


@requires_tasks
def test_priority_is_dropped_where_the_backend_has_none(
    db, user, settings, alias, use_executor, monkeypatch, django_capture_on_commit_callbacks
):
    settings.TASKS = {
        alias: {"BACKEND": "tests.executors.backends.NoPriorityBackend", "QUEUES": []}
    }
    monkeypatch.setattr(RoutedJobType, "priority", 7)
    with django_capture_on_commit_callbacks(execute=True):
        job = JobHandler.create_and_start(user, "routed")
    [result] = get_executor().task_for(RoutedJobType()).get_backend().results
    assert result.args == [job.pk, "routed"]
    assert (result.task.queue_name, result.task.priority) == ("special", 0)


def rename_table(model, old_name, new_name):
    with connection.schema_editor() as editor:
        editor.alter_db_table(model, old_name, new_name)


@requires_tasks
def test_backend_that_cannot_write_fails_the_job_and_tells_the_caller(
    transactional_db, user, use_executor, DBTaskResult
):
    # The task table is missing, as when django_tasks_db's migrations were never applied.
    table = DBTaskResult._meta.db_table
    rename_table(DBTaskResult, table, f"{table}_away")
    try:
        with pytest.raises(DispatchError, match="could not be handed to the django.tasks backend"):
            JobHandler.create_and_start(user, "scripted", steps=3)
    finally:
        rename_table(DBTaskResult, f"{table}_away", table)
    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    assert "could not be handed" in job.error
    assert job.human_readable_error == django_tasks.UNDISPATCHED_MESSAGE
    assert job.finished_at is not None
    assert list(HookCall.objects.filter(job_id=job.pk).values_list("hook", flat=True)) == [
        "on_error"
    ]
    # What a poller sees.
    assert JobHandler.get_job(user, job.pk).state == "failed"


@requires_tasks
@pytest.mark.skipif(find_spec("django_tasks_db") is None, reason="django-tasks-db is not installed")
def test_a_job_started_without_the_database_backend_app_says_to_install_it(tmp_path):
    # manage.py shell runs no checks, so E027 is not shown before the job is started; the
    # backend's model then refuses to load outside INSTALLED_APPS.
    installed = ["django.contrib.contenttypes", "django.contrib.auth", "task_ferry"]
    installed += [*([] if HAS_BUILTIN_TASKS else ["django_tasks"]), "tests.myapp"]
    project_settings = {
        "SECRET_KEY": "tests-only",
        "USE_TZ": True,
        "INSTALLED_APPS": installed,
        "DATABASES": {
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "db")}
        },
        "TASKS": {"default": {"BACKEND": DATABASE_BACKEND}},
        "TASK_FERRY": {"EXECUTOR": EXECUTOR, "REDIS_URL": None},
    }
    code = """
from django.core.management import call_command
from task_ferry.exceptions import DispatchError
from task_ferry.handler import JobHandler
from tests.myapp.models import ExportJob
call_command("migrate", verbosity=0, skip_checks=True)
try:
    JobHandler.create_and_start(None, "export_table", table_id=1)
except DispatchError as exc:
    print("DispatchError:", exc)
print("Shown to the user:", ExportJob.objects.get().human_readable_error)
"""
    returncode, output = run_python(tmp_path, project_settings, code)
    assert returncode == 0, output
    assert 'Add "django_tasks_db" to INSTALLED_APPS and run migrate' in output
    assert "reachable" not in output
    assert f"Shown to the user: {django_tasks.MISCONFIGURED_MESSAGE}" in output


@requires_tasks
def test_a_backend_error_no_database_stores_as_it_is_still_fails_the_job(
    transactional_db, user, settings, alias, use_executor
):
    settings.TASKS = {alias: {"BACKEND": "tests.executors.backends.RefusingBackend", "QUEUES": []}}
    with pytest.raises(DispatchError, match="queue full"):
        JobHandler.create_and_start(user, "scripted")
    job = ScriptedJob.objects.get()
    assert job.state == "failed"
    assert "ValueError: queue full\ufffdxxx" in job.error
    assert job.error.endswith("x…") and len(job.error) == ERROR_TEXT_MAX_LENGTH
    assert job.human_readable_error == django_tasks.UNDISPATCHED_MESSAGE
    assert list(HookCall.objects.filter(job_id=job.pk).values_list("hook", flat=True)) == [
        "on_error"
    ]


@requires_tasks
def test_queue_rejected_by_the_backend_fails_the_job(
    transactional_db, user, settings, alias, use_executor, DBTaskResult
):
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND, "QUEUES": ["default"]}}
    with pytest.raises(DispatchError, match="special") as raised:
        JobHandler.create_and_start(user, "routed")
    # The backend is reachable and set up: the advice is about the queue.
    assert f"Add the job type's queue to TASKS[{alias!r}]['QUEUES']" in str(raised.value)
    assert "reachable" not in str(raised.value)
    job = Job.objects.get()
    assert job.state == "failed"
    # The user is not told to try again: the same type is refused until the setup changes.
    assert job.human_readable_error == django_tasks.MISCONFIGURED_MESSAGE
    assert "Try again later" not in job.human_readable_error
    assert not DBTaskResult.objects.exists()


@requires_tasks
def test_a_batch_the_backend_refuses_fails_every_job_of_it(
    transactional_db, user, settings, alias, use_executor, DBTaskResult
):
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND, "QUEUES": ["default"]}}
    with pytest.raises(DispatchError, match=r"The 2 job\(s\) after it in the same transaction"):
        JobHandler.create_and_start_many(user, "routed", [{}, {}, {}])
    assert list(Job.objects.order_by("pk").values_list("state", "human_readable_error")) == [
        ("failed", django_tasks.MISCONFIGURED_MESSAGE),
        # Never offered to the backend: nothing says their own setup is wrong.
        ("failed", django_tasks.UNDISPATCHED_MESSAGE),
        ("failed", django_tasks.UNDISPATCHED_MESSAGE),
    ]
    assert not DBTaskResult.objects.exists()


@requires_tasks
def test_a_batch_is_enqueued_on_commit_with_one_task_per_job(
    transactional_db, user, use_executor, DBTaskResult
):
    with transaction.atomic():
        jobs = JobHandler.create_and_start_many(user, "scripted", [{}, {}, {}])
        assert not DBTaskResult.objects.exists()
    enqueued = sorted(task.args_kwargs["args"][0] for task in DBTaskResult.objects.all())
    assert enqueued == sorted(job.pk for job in jobs)


@requires_tasks
def test_a_refused_job_fails_the_jobs_its_transaction_had_still_to_enqueue(
    transactional_db, user, settings, alias, use_executor, DBTaskResult
):
    """Jobs started one by one in a transaction: Django drops the callbacks after the one
    that raised, so the jobs they would have enqueued are failed with it, not left pending."""
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND, "QUEUES": ["default"]}}
    with pytest.raises(DispatchError, match=r"The 2 job\(s\) after it"), transaction.atomic():
        enqueued = JobHandler.create_and_start(user, "scripted")
        refused = JobHandler.create_and_start(user, "routed")
        later = [JobHandler.create_and_start(user, "scripted") for _ in range(2)]

    assert Job.objects.get(pk=enqueued.pk).state == "pending"
    assert [task.args_kwargs["args"] for task in DBTaskResult.objects.all()] == [
        [enqueued.pk, "scripted"]
    ]
    states = Job.objects.filter(pk__in=[refused.pk, *(job.pk for job in later)])
    assert list(states.values_list("state", flat=True)) == ["failed"] * 3


@requires_tasks
def test_a_refusal_leaves_alone_the_job_that_took_the_id_of_one_rolled_back_with_a_savepoint(
    transactional_db, user, settings, alias, use_executor, DBTaskResult
):
    """On SQLite the id of a job rolled back with a savepoint goes to the next job created, here
    by a commit hook of the transaction. When a later job of the transaction is refused, the
    hook's job is not failed in the rolled-back one's place, and the error counts only the
    jobs it failed."""
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND, "QUEUES": ["default"]}}
    started_by_hook = []

    def start_another_job():
        with transaction.atomic():
            started_by_hook.append(JobHandler.create_and_start(user, "scripted"))

    with pytest.raises(DispatchError) as raised, transaction.atomic():
        transaction.on_commit(start_another_job)
        refused = JobHandler.create_and_start(user, "routed")
        later = JobHandler.create_and_start(user, "scripted")
        with pytest.raises(RuntimeError), transaction.atomic():
            rolled_back = JobHandler.create_and_start(user, "scripted")
            raise RuntimeError

    [hook_job] = started_by_hook
    if connection.vendor == "sqlite":
        assert hook_job.pk == rolled_back.pk
    assert Job.objects.get(pk=hook_job.pk).state == "pending"
    assert [task.args_kwargs["args"] for task in DBTaskResult.objects.all()] == [
        [hook_job.pk, "scripted"]
    ]
    assert [Job.objects.get(pk=job.pk).state for job in (refused, later)] == ["failed"] * 2
    assert f"The 1 job(s) after it in the same transaction (id {later.pk}) were" in str(
        raised.value
    )


@requires_tasks
def test_failure_at_the_outer_commit_still_fails_the_job(
    transactional_db, user, settings, alias, use_executor
):
    settings.TASKS = {alias: {"BACKEND": DATABASE_BACKEND, "QUEUES": ["default"]}}
    with pytest.raises(DispatchError), transaction.atomic():
        job = JobHandler.create_and_start(user, "routed")
    # The job row committed before dispatch failed; it is failed, not pending forever.
    assert Job.objects.get(pk=job.pk).state == "failed"


@requires_tasks
def test_obsolete_backend_path_at_dispatch_says_what_to_use(
    transactional_db, user, settings, alias, use_executor
):
    settings.TASKS = {alias: {"BACKEND": "django_tasks.backends.database.DatabaseBackend"}}
    with pytest.raises(DispatchError, match=f'Use "BACKEND": "{DATABASE_BACKEND}"'):
        JobHandler.create_and_start(user, "scripted")
    job = Job.objects.get()
    assert job.state == "failed"
    assert job.human_readable_error == django_tasks.MISCONFIGURED_MESSAGE


@requires_tasks
def test_tasks_written_as_a_list_fails_the_job_at_dispatch_with_the_advice(
    transactional_db, user, settings, use_executor
):
    settings.TASKS = [{"BACKEND": DATABASE_BACKEND}]
    with pytest.raises(DispatchError, match="Check that the TASKS backend is reachable"):
        JobHandler.create_and_start(user, "scripted")
    assert Job.objects.get().state == "failed"


@requires_tasks
@pytest.mark.django_db(transaction=True, databases=["default", "jobs"])
def test_dispatch_waits_for_the_commit_of_the_database_jobs_are_routed_to(
    settings, user, use_executor, DBTaskResult
):
    settings.DATABASE_ROUTERS = ["tests.routers.JobsInTheirOwnDatabase"]
    with transaction.atomic(using="jobs"):
        job = JobHandler.create_and_start(user, "scripted", steps=3)
        assert not DBTaskResult.objects.exists()
    assert DBTaskResult.objects.get().args_kwargs == {"args": [job.pk, "scripted"], "kwargs": {}}

    with pytest.raises(RuntimeError, match="roll back"), transaction.atomic(using="jobs"):
        JobHandler.create_and_start_many(user, "scripted", [{"steps": 1}, {"steps": 2}])
        raise RuntimeError("roll back")
    assert DBTaskResult.objects.count() == 1


@requires_tasks
def test_a_task_starts_its_job_as_its_types_model_in_one_statement_on_postgresql(
    transactional_db, user, settings, alias, backends, use_executor
):
    """The task carries the type's name, so the worker loads the job as the type's model as it
    moves it to started: in the same statement on PostgreSQL, with one read elsewhere (without
    the name: the base row, then the type's)."""
    settings.TASKS = {alias: {"BACKEND": backends["dummy"], "QUEUES": []}}
    job = JobHandler.create_and_start(user, "scripted", steps=2)
    [result] = get_executor().task_for(job_type_registry.get("scripted")).get_backend().results
    assert result.args == [job.pk, "scripted"]
    with CaptureQueriesContext(connection) as captured:
        django_tasks.run_job.call(*result.args)
    assert ScriptedJob.objects.get(pk=job.pk).state == JobState.FINISHED
    reads = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("SELECT")]
    if connection.vendor == "postgresql":
        assert reads == []
    else:
        [read] = reads
        assert ScriptedJob._meta.db_table in read


@requires_tasks
def test_a_task_enqueued_with_the_job_id_alone_still_runs_its_job(
    transactional_db, user, settings, alias, backends
):
    """Tasks of an earlier release, enqueued before it sent the type's name, still run."""
    settings.TASKS = {alias: {"BACKEND": backends["immediate"], "QUEUES": []}}
    job = make_job(user, marker="queued by an earlier release")
    result = django_tasks.run_job.using(backend=alias).enqueue(job.pk)
    assert result.status == "SUCCESSFUL"
    assert ScriptedJob.objects.get(pk=job.pk).state == JobState.FINISHED
    assert Marker.objects.filter(name="queued by an earlier release").exists()


@requires_tasks
def test_a_task_for_an_id_no_job_can_have_fails_once_and_says_why(
    transactional_db, settings, alias, backends, caplog
):
    # A forged or malformed task: its result fails, naming the id, and it is not run again.
    settings.TASKS = {alias: {"BACKEND": backends["immediate"], "QUEUES": []}}
    with caplog.at_level("ERROR", logger="task_ferry"):
        result = django_tasks.run_job.using(backend=alias).enqueue("abc")
    assert result.status == "FAILED"
    [error] = result.errors
    assert error.exception_class_path == "task_ferry.exceptions.InvalidJobId"
    assert "Cannot run job 'abc'" in error.traceback
    [record] = [r for r in caplog.records if r.name == "task_ferry"]
    assert record.getMessage().startswith("Refused a run_job task: Cannot run job 'abc'")


@requires_tasks
def test_the_maintenance_tasks_log_how_many_jobs_they_deleted_or_failed(
    transactional_db, settings, alias, backends, caplog
):
    # db_worker logs that a task ran, not what it returned: its log could not tell whether the
    # daily clean-up deleted anything, or whether the sweep keeps failing jobs.
    settings.TASKS = {alias: {"BACKEND": backends["immediate"], "QUEUES": []}}
    ten_days_ago = timezone.now() - datetime.timedelta(days=10)
    for _ in range(2):
        make_job(state=JobState.FINISHED, finished_at=ten_days_ago)
    make_job(state=JobState.FINISHED, finished_at=timezone.now())
    lost = started_job(started_ago=datetime.timedelta(hours=1))
    with caplog.at_level("INFO", logger="task_ferry"):
        cleanup = django_tasks.cleanup_old_jobs.using(backend=alias).enqueue()
        sweep = django_tasks.sweep_stale_jobs.using(backend=alias).enqueue()
    assert (cleanup.status, cleanup.return_value) == ("SUCCESSFUL", 2)
    assert (sweep.status, sweep.return_value) == ("SUCCESSFUL", 1)
    assert Job.objects.get(pk=lost.pk).state == JobState.FAILED
    logged = [r.getMessage() for r in caplog.records if r.name == "task_ferry"]
    assert "cleanup_old_jobs: deleted 2 ended job(s) older than JOB_EXPIRY_DAYS (7 days)." in logged
    assert "sweep_stale_jobs: failed 1 stale job(s)." in logged

    # Run every minute: a round that finds nothing says so at DEBUG only.
    caplog.clear()
    with caplog.at_level("DEBUG", logger="task_ferry"):
        django_tasks.sweep_stale_jobs.using(backend=alias).enqueue()
    [nothing] = [r for r in caplog.records if r.getMessage().startswith("sweep_stale_jobs:")]
    assert (nothing.getMessage(), nothing.levelname) == (
        "sweep_stale_jobs: failed 0 stale job(s).",
        "DEBUG",
    )
