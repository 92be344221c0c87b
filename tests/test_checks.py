"""Every task_ferry system check id, raised by the configuration it describes."""

import importlib
import re
import sys
from datetime import timedelta
from importlib.util import find_spec

import pytest
from django.conf import settings as django_settings
from django.core.checks import run_checks

import task_ferry.executors
from task_ferry.api.permissions import IsJobOwner
from task_ferry.registry import JobType, job_type_registry
from tests.jobs import pending_job, started_job, sweep_messages
from tests.ports import free_port
from tests.testapp import job_types as testapp_job_types
from tests.testapp.models import LimitedJob, ScriptedJob


def plain_checks():
    """What a plain ``check`` reports, without a database: Django 6.1 gives the model checks
    every alias when ``databases`` is None, and on SQLite the JSONField check then queries the
    database, which these tests do not open. task_ferry's checks do not look at the aliases
    (test_the_job_types_check_makes_no_query_whatever_databases_it_is_given)."""
    return run_checks(databases=[])


def ferry_messages():
    return [m for m in plain_checks() if (m.id or "").startswith("task_ferry.")]


def ids(messages):
    return sorted(m.id for m in messages)


def only(check_id):
    (message,) = [m for m in ferry_messages() if m.id == check_id]
    return message


@pytest.fixture
def ferry(settings):
    """Sets TASK_FERRY keys on top of the test settings."""

    def configure(**values):
        settings.TASK_FERRY = {**settings.TASK_FERRY, **values}

    return configure


@pytest.fixture
def registry_snapshot():
    """Restores the registry and the registered classes' names after the test."""
    saved = dict(job_type_registry._by_name)
    names = {type(t): t.type for t in saved.values()}
    yield
    job_type_registry._by_name.clear()
    job_type_registry._by_name.update(saved)
    for cls, name in names.items():
        cls.type = name


def test_the_test_settings_pass_every_check():
    assert ferry_messages() == []


def test_e001_executor_path_that_does_not_import(ferry):
    ferry(EXECUTOR="myproject.executors.Nope")
    message = only("task_ferry.E001")
    assert "'myproject.executors.Nope' cannot be imported" in message.msg
    assert "ImmediateExecutor" in message.hint


@pytest.mark.parametrize(
    ("path", "module", "extra", "check_ids"),
    [
        (
            "task_ferry.executors.celery.CeleryExecutor",
            "celery",
            "celery",
            {"task_ferry.E001", "task_ferry.E010"},
        ),
        pytest.param(
            "task_ferry.executors.django_tasks.DjangoTasksExecutor",
            "django_tasks",
            "django-tasks",
            {"task_ferry.E001", "task_ferry.E020"},
            # Hiding Django's own django.tasks would break Django's checks; the .venv-core
            # session and tests/executors/test_django_tasks.py cover E020 there.
            marks=pytest.mark.skipif(
                find_spec("django.tasks") is not None, reason="Django 6 ships django.tasks"
            ),
        ),
    ],
)
def test_missing_extra_is_named(ferry, monkeypatch, path, module, extra, check_ids):
    # Imported with the package first, so that the tests after this one get it back.
    executor_module = importlib.import_module(path.rsplit(".", 1)[0])
    monkeypatch.setattr(task_ferry.executors, path.split(".")[2], executor_module)
    # Hide the installed package, as in a virtualenv without the extra.
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, executor_module.__name__)
    ferry(EXECUTOR=path)
    # E001 when the executor module itself needs the package, else the executor's own check.
    (message,) = [m for m in ferry_messages() if m.is_serious()]
    assert message.id in check_ids
    assert f"django-task-ferry[{extra}]" in message.hint


def test_e001_message_names_the_extra():
    from task_ferry.executors.base import missing_extra

    celery_missing = ModuleNotFoundError("No module named 'celery'", name="celery")
    assert missing_extra(celery_missing) == "celery"
    typo = ModuleNotFoundError("nope", name="myproject")
    assert missing_extra(typo) is None
    # A class the executor module does not define: a typo, whatever the module.
    class_typo = ImportError('Module "task_ferry.executors.celery" does not define a "X"')
    assert missing_extra(class_typo) is None


@pytest.mark.parametrize(
    "path",
    [
        "task_ferry.executors.celery.CeleryExecuter",
        "task_ferry.executors.django_tasks.DjangoTaskExecutor",
    ],
)
def test_e001_class_name_typo_in_an_executor_module_is_not_a_missing_extra(ferry, path):
    module, name = path.rsplit(".", 1)
    ferry(EXECUTOR=path)
    message = only("task_ferry.E001")
    assert f'Module "{module}" does not define a "{name}" attribute/class' in message.msg
    assert "extra" not in message.msg
    assert "pip install" not in message.hint
    assert "task_ferry.executors.celery.CeleryExecutor" in message.hint
    assert "task_ferry.executors.django_tasks.DjangoTasksExecutor" in message.hint
    assert "task_ferry.executors.immediate.ImmediateExecutor" in message.hint


def test_e001_executor_that_is_not_an_executor(ferry):
    ferry(EXECUTOR="task_ferry.progress.Progress")
    assert (
        "is not a subclass of task_ferry.executors.base.BaseExecutor" in only("task_ferry.E001").msg
    )


@pytest.mark.parametrize("value", ["some string", ["EXECUTOR"], ""])
def test_task_ferry_that_is_not_a_dict_is_improperly_configured(settings, value):
    from task_ferry.conf import ferry_settings
    from task_ferry.exceptions import TaskFerryImproperlyConfigured

    settings.TASK_FERRY = value
    message = f"TASK_FERRY must be a dict of settings, got {type(value).__name__}: {value!r}."
    with pytest.raises(TaskFerryImproperlyConfigured, match=re.escape(message)):
        plain_checks()
    with pytest.raises(TaskFerryImproperlyConfigured, match=re.escape(message)):
        ferry_settings.EXECUTOR  # noqa: B018 - reading it is what raises


def test_e002_unknown_setting(ferry):
    ferry(JOB_EXPIRY=3)
    message = only("task_ferry.E002")
    assert "JOB_EXPIRY" in message.msg
    assert "JOB_EXPIRY_DAYS" in message.hint


def test_e002_names_each_unknown_key_and_the_setting_it_is_close_to(ferry):
    ferry(EXECUTER="x", REDIS_URl="redis://127.0.0.1:6379/0", **{"CACHE_ALIAS ": "default"})
    message = only("task_ferry.E002")
    assert message.msg == (
        "TASK_FERRY has unknown key(s): 'CACHE_ALIAS ' (did you mean 'CACHE_ALIAS'?), "
        "'EXECUTER' (did you mean 'EXECUTOR'?), 'REDIS_URl' (did you mean 'REDIS_URL'?)."
    )


@pytest.mark.parametrize("name", ["TASK_FERY", "TASKFERRY", "TASK_FERRY_"])
def test_w008_a_misspelt_task_ferry_setting_is_named(settings, name):
    # Its keys were ignored without a word: the project ran on the defaults.
    del settings.TASK_FERRY
    setattr(settings, name, {"EXECUTOR": "task_ferry.executors.celery.CeleryExecutor"})
    message = only("task_ferry.W008")
    assert message.msg.startswith(f"There is no TASK_FERRY setting, but there is {name}:")
    assert message.hint == f"Rename {name} to TASK_FERRY."


def test_w008_not_reported_beside_task_ferry(settings):
    settings.TASK_FERRY_EXTRA = {}
    settings.TASK_FERY = {}
    assert "task_ferry.W008" not in ids(ferry_messages())


@pytest.mark.parametrize("key", [1, ("EXECUTOR",), None])
def test_e002_unknown_key_that_is_not_a_str(settings, key):
    # Joining the names failed with a TypeError: check, runserver and migrate stopped on it.
    settings.TASK_FERRY = {**settings.TASK_FERRY, key: "x"}
    message = only("task_ferry.E002")
    assert message.msg == f"TASK_FERRY has unknown key(s): {key!r}."


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PROGRESS_CACHE_TIMEOUT", 0),
        # Redis refuses a fractional lifetime: every write would fail.
        ("PROGRESS_CACHE_TIMEOUT", 1.5),
        ("JOB_EXPIRY_DAYS", "7"),
        # Its cutoff would fall before year 1.
        ("JOB_EXPIRY_DAYS", 10_000_000),
        ("PUBLISH_INTERVAL", True),
        ("PENDING_TIMEOUT", "3600"),
        ("PENDING_TIMEOUT", -5),
        ("SSE_KEEPALIVE", "soon"),
        ("SSE_MAX_DURATION", None),
        ("HEARTBEAT_INTERVAL", float("nan")),
        # Celery would kill each time-limited run a moment past its limit, before its stop.
        ("CELERY_TIME_LIMIT_GRACE", 0),
        ("CELERY_TIME_LIMIT_GRACE", "60"),
    ],
)
def test_e003_setting_that_is_not_a_number_in_range(ferry, name, value):
    ferry(**{name: value})
    assert name in only("task_ferry.E003").msg


@pytest.mark.parametrize(
    ("name", "value", "range_"),
    [
        ("PENDING_TIMEOUT", 0, "from 1 to 31536000 or None"),
        ("SSE_MAX_STREAMS_PER_USER", -1, "from 0 to 1000000 or None"),
        ("PROGRESS_CACHE_TIMEOUT", 0, "from 1 to 315360000,"),
        ("PUBLISH_INTERVAL", 0, "from 0.001 to 3600,"),
    ],
)
def test_e003_gives_the_range_in_plain_digits(ferry, name, value, range_):
    # A year was "3.1536e+07".
    ferry(**{name: value})
    assert range_ in only("task_ferry.E003").msg


@pytest.mark.parametrize("name", ["PENDING_TIMEOUT", "CELERY_TIME_LIMIT_GRACE"])
def test_a_setting_that_turns_its_limit_off_may_be_none(ferry, name):
    ferry(**{name: None})
    assert ferry_messages() == []


@pytest.mark.parametrize(
    "values",
    [{"HEARTBEAT_INTERVAL": "10"}, {"HEARTBEAT_TIMEOUT": "60"}, {"HEARTBEAT_TIMEOUT": None}],
)
def test_a_heartbeat_setting_that_is_not_a_number_is_e003_and_no_crash(ferry, values):
    ferry(**values)
    assert ids(ferry_messages()) == ["task_ferry.E003"]


@pytest.mark.parametrize("value", [0, -1, "5", 2.5])
def test_e004_bad_max_jobs_per_user(ferry, value):
    ferry(MAX_JOBS_PER_USER_PER_TYPE=value)
    assert "MAX_JOBS_PER_USER_PER_TYPE" in only("task_ferry.E004").msg


def test_e005_heartbeat_timeout_not_above_interval(ferry):
    ferry(HEARTBEAT_INTERVAL=30, HEARTBEAT_TIMEOUT=30)
    assert "HEARTBEAT_TIMEOUT" in only("task_ferry.E005").msg


@pytest.mark.parametrize(("timeout", "interval"), [(1, 1), (1, 2.5), (60, 60), (3600, 3600)])
def test_w005_publish_interval_not_shorter_than_the_snapshots_lifetime(ferry, timeout, interval):
    # Every gap between two publications of a running job is at least the interval: its
    # snapshot has expired by the next one (test_monitor.py shows it on a running job).
    ferry(PROGRESS_CACHE_TIMEOUT=timeout, PUBLISH_INTERVAL=interval)
    message = only("task_ferry.W005")
    assert message.msg == (
        f"TASK_FERRY['PROGRESS_CACHE_TIMEOUT'] ({timeout} s) is not longer than "
        f"PUBLISH_INTERVAL ({interval:g} s): a running job's snapshot expires before the monitor "
        f"publishes it again, and polls in between answer from the job's row, without its "
        f"progress."
    )
    suggested = int(re.search(r"to (\d+) or more", message.hint)[1])
    ferry(PROGRESS_CACHE_TIMEOUT=suggested)
    assert "task_ferry.W005" not in ids(ferry_messages())


@pytest.mark.parametrize(
    ("timeout", "interval"),
    # Over half the timeout, the monitor rewrites the snapshot at every publication; at half
    # or less, at the first past half its lifetime, still before it expires.
    [(1, 0.999), (1, 0.5), (1, 0.45), (60, 59), (60, 30), (3600, 0.05)],
)
def test_w005_not_while_each_publication_comes_before_the_snapshot_expires(
    ferry, timeout, interval
):
    ferry(PROGRESS_CACHE_TIMEOUT=timeout, PUBLISH_INTERVAL=interval)
    assert "task_ferry.W005" not in ids(ferry_messages())


def test_w005_not_while_either_setting_is_refused(ferry):
    ferry(PROGRESS_CACHE_TIMEOUT=1.5, PUBLISH_INTERVAL=10)
    assert "task_ferry.W005" not in ids(ferry_messages())
    ferry(PROGRESS_CACHE_TIMEOUT=10, PUBLISH_INTERVAL="20")
    assert "task_ferry.W005" not in ids(ferry_messages())


def test_e006_progress_store_that_does_not_import(ferry):
    ferry(PROGRESS_STORE="myproject.stores.Nope")
    assert "myproject.stores.Nope" in only("task_ferry.E006").msg


def test_e006_progress_store_that_is_not_a_store(ferry):
    ferry(PROGRESS_STORE="collections.OrderedDict")
    assert "not a ProgressStore" in only("task_ferry.E006").msg


def test_e006_redis_url_without_its_scheme(ferry):
    ferry(REDIS_URL="127.0.0.1:6379", PROGRESS_STORE=None)
    message = only("task_ferry.E006")
    assert "cannot be created" in message.msg and "redis://" in message.hint


def test_e001_executor_given_as_a_class(ferry):
    from task_ferry.executors.immediate import ImmediateExecutor

    ferry(EXECUTOR=ImmediateExecutor)
    assert "must be a dotted path" in only("task_ferry.E001").msg


def test_e008_api_permission_class_that_does_not_import(ferry):
    ferry(API_PERMISSION_CLASS="myproject.permissions.Nope")
    assert "myproject.permissions.Nope" in only("task_ferry.E008").msg


@pytest.mark.skipif(find_spec("celery") is None, reason="celery is not installed")
@pytest.mark.parametrize("value", [None, "", 5])
def test_e013_celery_queue_that_is_not_a_queues_name(ferry, value):
    # str() of it went on as the queue's name: None sent every job to a queue "None", which no
    # worker consumes, and the jobs waited until PENDING_TIMEOUT failed them.
    ferry(EXECUTOR="task_ferry.executors.celery.CeleryExecutor", CELERY_QUEUE=value)
    message = only("task_ferry.E013")
    assert message.msg == (
        f"TASK_FERRY['CELERY_QUEUE'] must be the name of a Celery queue (a non-empty str), "
        f"got {value!r}."
    )


@pytest.mark.parametrize("value", [IsJobOwner, None])
def test_e008_api_permission_class_that_is_not_a_dotted_path(ferry, value):
    # The class itself where its path belongs: the check crashed with an AttributeError.
    ferry(API_PERMISSION_CLASS=value)
    message = only("task_ferry.E008")
    assert message.msg == (
        f"TASK_FERRY['API_PERMISSION_CLASS'] must be a dotted path (a string), got {value!r}."
    )


def test_e006_progress_store_given_as_a_class(ferry):
    from task_ferry.stores.cache import CacheProgressStore

    ferry(PROGRESS_STORE=CacheProgressStore)
    message = only("task_ferry.E006")
    assert message.msg == (
        "TASK_FERRY['PROGRESS_STORE'] must be a dotted path (a string), got "
        f"{CacheProgressStore!r}."
    )


class HidesEveryJob(IsJobOwner):
    def has_object_permission(self, request, view, obj):
        return False


def test_e040_api_permission_class_that_relies_on_has_object_permission(ferry):
    # The API answers details and events from the progress store: it never calls it, so
    # this policy would let its users see and cancel their jobs all the same.
    ferry(API_PERMISSION_CLASS="tests.test_checks.HidesEveryJob")
    message = only("task_ferry.E040")
    assert "has_object_permission" in message.msg
    assert "can_view" in message.hint and "visible_jobs" in message.hint
    ferry(API_PERMISSION_CLASS="task_ferry.api.permissions.IsJobOwnerOrStaff")
    assert not [m for m in ferry_messages() if m.id == "task_ferry.E040"]


def test_e009_cache_alias_not_in_caches(ferry):
    ferry(REDIS_URL=None, PROGRESS_STORE=None, CACHE_ALIAS="progress")
    message = only("task_ferry.E009")
    assert "'progress'" in message.msg and "default" in message.hint


@pytest.mark.parametrize("alias", [["default"], {"default": 1}])
def test_e009_cache_alias_that_is_no_string_is_named_not_a_crash(ferry, alias):
    # Used as a key of CACHES: TypeError out of `check` and `migrate`.
    ferry(REDIS_URL=None, PROGRESS_STORE=None, CACHE_ALIAS=alias)
    message = only("task_ferry.E009")
    assert f"is {alias!r}, which is not in CACHES" in message.msg and "default" in message.hint


@pytest.mark.parametrize("prefix", ["my app", "x" * 240])
def test_w004_key_prefix_that_memcached_refuses(ferry, prefix):
    # Memcached refuses every write of such a key (the progress and cancel requests were
    # lost, logged one by one); the other caches warn at each.
    ferry(REDIS_URL=None, PROGRESS_STORE=None, KEY_PREFIX=prefix)
    message = only("task_ferry.W004")
    assert message.msg.startswith(
        f"TASK_FERRY['KEY_PREFIX'] = {prefix!r} makes keys that memcached "
    )
    assert "KEY_PREFIX" in message.hint


def test_w004_not_for_the_redis_store(ferry):
    ferry(REDIS_URL="redis://127.0.0.1:6379/9", PROGRESS_STORE=None, KEY_PREFIX="my app")
    assert "task_ferry.W004" not in ids(ferry_messages())


OUT_OF_PROCESS = "tests.reliability.executors.QueueingExecutor"


@pytest.mark.parametrize(
    ("backend", "kind"),
    [
        ("django.core.cache.backends.locmem.LocMemCache", "each process keeps to itself"),
        ("django.core.cache.backends.dummy.DummyCache", "stores nothing"),
    ],
)
def test_w003_cache_store_that_workers_cannot_share(ferry, settings, backend, kind):
    settings.CACHES = {"default": {"BACKEND": backend}}
    ferry(REDIS_URL=None, PROGRESS_STORE=None, EXECUTOR=OUT_OF_PROCESS)
    message = only("task_ferry.W003")
    assert message.is_serious() is False
    assert kind in message.msg and "QueueingExecutor runs jobs in worker processes" in message.msg
    assert "REDIS_URL" in message.hint and "CACHE_ALIAS" in message.hint


def test_w003_not_for_a_shared_cache_or_jobs_run_inline(ferry, settings, tmp_path):
    ferry(REDIS_URL=None, PROGRESS_STORE=None)
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    assert "task_ferry.W003" not in ids(ferry_messages())  # the ImmediateExecutor
    ferry(EXECUTOR=OUT_OF_PROCESS)
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(tmp_path),
        }
    }
    assert "task_ferry.W003" not in ids(ferry_messages())


DATABASE_CACHE = "django.core.cache.backends.db.DatabaseCache"


def cache_table_messages():
    from django.db import connection

    return [m for m in run_checks(databases=[connection.alias]) if m.id == "task_ferry.W006"]


def test_w006_database_cache_without_its_table(ferry, settings, db):
    # The cache W003's hint suggests, before createcachetable: every snapshot failed in the
    # worker, and check said nothing.
    settings.CACHES = {
        **settings.CACHES,
        "progress": {"BACKEND": DATABASE_CACHE, "LOCATION": "tf_progress_cache"},
    }
    ferry(REDIS_URL=None, PROGRESS_STORE=None, CACHE_ALIAS="progress")
    (message,) = cache_table_messages()
    assert message.is_serious() is False
    assert "'progress'" in message.msg and "'tf_progress_cache' does not exist" in message.msg
    assert message.hint == "Run python manage.py createcachetable."
    assert "task_ferry.W006" not in ids(ferry_messages())  # a plain check opens no database


def test_w006_not_once_the_table_exists(ferry, settings, db):
    from django.core.management import call_command

    settings.CACHES = {
        **settings.CACHES,
        "progress": {"BACKEND": DATABASE_CACHE, "LOCATION": "tf_progress_cache"},
    }
    ferry(REDIS_URL=None, PROGRESS_STORE=None, CACHE_ALIAS="progress")
    call_command("createcachetable", "tf_progress_cache", verbosity=0)
    assert cache_table_messages() == []


def test_w006_not_for_other_stores(ferry, settings, db):
    settings.CACHES = {
        **settings.CACHES,
        "progress": {"BACKEND": DATABASE_CACHE, "LOCATION": "tf_progress_cache"},
    }
    ferry(CACHE_ALIAS="progress", REDIS_URL="redis://127.0.0.1:6379/0", PROGRESS_STORE=None)
    assert cache_table_messages() == []


def test_w007_not_while_the_sweep_may_yet_fail_them(ferry, db):
    # A healthy system: jobs that beat, jobs just past a timeout that the next sweep round
    # fails (within a minute on the documented schedules), pending jobs within PENDING_TIMEOUT.
    ferry(HEARTBEAT_TIMEOUT=60, PENDING_TIMEOUT=3600)
    started_job(started_ago=timedelta(hours=5), beat_ago=timedelta(seconds=5))
    started_job(started_ago=timedelta(hours=5), beat_ago=timedelta(minutes=9))
    started_job(started_ago=timedelta(seconds=3))  # not beaten yet
    started_job(started_ago=timedelta(minutes=9))  # died before its first beat, not long ago
    pending_job(created_ago=timedelta(minutes=59))
    pending_job(created_ago=timedelta(minutes=65))
    assert sweep_messages() == []


def test_w007_a_started_job_silent_well_past_heartbeat_timeout(ferry, db):
    """A worker died 20 minutes ago and its job still shows started: nothing runs the sweep
    (no beat, or no worker on its queue), and nothing said so."""
    ferry(HEARTBEAT_TIMEOUT=60)
    started_job(started_ago=timedelta(hours=2), beat_ago=timedelta(minutes=12))
    longest = started_job(started_ago=timedelta(hours=2), beat_ago=timedelta(minutes=20))
    started_job(started_ago=timedelta(hours=2), beat_ago=timedelta(seconds=5))
    (message,) = sweep_messages()
    assert message.is_serious() is False
    assert re.fullmatch(
        rf"2 started job\(s\) with no heartbeat for over HEARTBEAT_TIMEOUT \(60 s\) plus 10 "
        rf"minutes \(the longest: job #{longest.pk}, for 0:20:0\d\): the stale-job sweep, which "
        rf"fails such jobs, is evidently not running\. Until it runs they stay as they are, and "
        rf"their users watch progress that never moves\.",
        message.msg,
    ), message.msg
    assert "python manage.py task_ferry_sweep --interval 60" in message.hint
    assert "task_ferry.executors.celery.beat_schedule()" in message.hint
    assert "worker -Q maintenance" in message.hint
    # A plain check (runserver) counts no jobs.
    assert "task_ferry.W007" not in ids(ferry_messages())


def test_w007_a_started_job_that_never_beat(ferry, db):
    ferry(HEARTBEAT_TIMEOUT=60)
    job = started_job(started_ago=timedelta(minutes=15))
    (message,) = sweep_messages()
    assert "1 started job(s) with no heartbeat" in message.msg
    assert f"job #{job.pk}, for 0:15:0" in message.msg


def test_w007_a_pending_job_well_past_pending_timeout(ferry, db):
    ferry(PENDING_TIMEOUT=86400)
    pending_job(created_ago=timedelta(days=1, minutes=5))  # the sweep's next round fails it
    oldest = pending_job(created_ago=timedelta(days=3, minutes=2))
    pending_job(created_ago=timedelta(days=2))
    (message,) = sweep_messages()
    assert message.msg.startswith(
        f"2 pending job(s) waiting for over PENDING_TIMEOUT (86400 s) plus 10 minutes (the "
        f"oldest: job #{oldest.pk}, for 3 days, 0:02:0"
    ), message.msg
    assert "the stale-job sweep, which fails such jobs, is evidently not running" in message.msg


def test_w007_names_both_kinds_in_one_warning(ferry, db):
    ferry(HEARTBEAT_TIMEOUT=60, PENDING_TIMEOUT=3600)
    started_job(started_ago=timedelta(hours=1), beat_ago=timedelta(hours=1))
    pending_job(created_ago=timedelta(hours=2))
    (message,) = sweep_messages()
    assert message.msg.startswith("1 started job(s) with no heartbeat for over ")
    assert ") and 1 pending job(s) waiting for over PENDING_TIMEOUT (3600 s) " in message.msg


def test_w007_not_for_pending_jobs_without_pending_timeout(ferry, db):
    ferry(PENDING_TIMEOUT=None)
    pending_job(created_ago=timedelta(days=30))
    assert sweep_messages() == []


def test_w007_with_use_tz_off(ferry, settings, db):
    # Naive local times in the job tables: the age is still the time since the last beat.
    settings.USE_TZ = False
    ferry(HEARTBEAT_TIMEOUT=60)
    job = started_job(started_ago=timedelta(hours=1), beat_ago=timedelta(minutes=30))
    (message,) = sweep_messages()
    assert f"job #{job.pk}, for 0:30:0" in message.msg


def test_w007_not_while_heartbeat_timeout_fails_e003(ferry, db):
    ferry(HEARTBEAT_TIMEOUT="60")
    started_job(started_ago=timedelta(hours=1), beat_ago=timedelta(hours=1))
    assert sweep_messages() == []
    assert "task_ferry.E003" in ids(ferry_messages())


def test_w007_is_a_database_check_that_makes_no_query_without_a_database():
    # No test database: a query would fail. Django 6.1 gives untagged checks every alias on a
    # plain `check`; a database check gets them from `check --database` and `migrate` only.
    from django.core.checks import Tags

    from task_ferry.checks import check_sweep_runs

    assert Tags.database in check_sweep_runs.tags
    assert check_sweep_runs(databases=None) == []
    assert check_sweep_runs(databases=[]) == []
    assert "task_ferry.W007" not in ids(ferry_messages())


def test_w007_only_for_the_database_jobs_are_read_from(ferry, db):
    from task_ferry.checks import check_sweep_runs

    ferry(HEARTBEAT_TIMEOUT=60)
    started_job(started_ago=timedelta(hours=1), beat_ago=timedelta(hours=1))
    assert check_sweep_runs(databases=["analytics"]) == []
    assert ids(check_sweep_runs(databases=["analytics", "default"])) == ["task_ferry.W007"]


@pytest.mark.skipif(
    find_spec("django.tasks") is None and find_spec("django_tasks") is None,
    reason="neither django.tasks nor django-tasks is installed",
)
def test_w003_not_for_django_tasks_run_inside_the_request(ferry, settings):
    # ImmediateBackend runs each job in the process that starts it, which shares its locmem
    # with it: W023 says jobs do not reach a worker, and W003 would be a false alarm.
    ferry(
        REDIS_URL=None,
        PROGRESS_STORE=None,
        EXECUTOR="task_ferry.executors.django_tasks.DjangoTasksExecutor",
        TASKS_BACKEND="default",
    )
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    api = "django.tasks" if find_spec("django.tasks") is not None else "django_tasks"
    immediate = f"{api}.backends.immediate.ImmediateBackend"
    settings.TASKS = {"default": {"BACKEND": immediate, "QUEUES": []}}
    assert "task_ferry.W023" in ids(ferry_messages())
    assert "task_ferry.W003" not in ids(ferry_messages())
    if find_spec("django_tasks_db") is not None:
        # A db_worker runs them: its locmem is not the web process's.
        settings.TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []}}
        message = only("task_ferry.W003")
        assert "DjangoTasksExecutor runs jobs in worker processes" in message.msg


def only_for_limited_type_with(monkeypatch, attribute, value, check_id):
    """The one message ``check_id`` gives once the "limited" type's ``attribute`` is ``value``;
    it names the type."""
    job_type = job_type_registry.get("limited")
    monkeypatch.setattr(type(job_type), attribute, value)
    message = only(check_id)
    assert message.obj is type(job_type)
    return message


@pytest.mark.parametrize("value", [0, True, "2"])
def test_e007_bad_max_count(monkeypatch, value):
    only_for_limited_type_with(monkeypatch, "max_count", value, "task_ferry.E007")


@pytest.mark.parametrize("value", [5, ["exports"], b"exports"])
def test_e034_queue_that_is_not_a_name(monkeypatch, value):
    # The Celery executor failed each job's dispatch ("'int' object has no attribute
    # 'startswith'"), advising to check the broker.
    message = only_for_limited_type_with(monkeypatch, "queue", value, "task_ferry.E034")
    assert message.msg == (
        f"LimitedJobType.queue must be a queue's name (a str) or None, got {value!r}."
    )


@pytest.mark.parametrize("value", ["myapp.serializers.ExportSerializer", LimitedJob, 5])
def test_e035_serializer_class_that_is_not_a_serializer(monkeypatch, value):
    # POST /api/jobs/ of the type raised "'str' object is not callable", a 500.
    message = only_for_limited_type_with(monkeypatch, "serializer_class", value, "task_ferry.E035")
    assert message.msg == (
        f"LimitedJobType.serializer_class must be a DRF serializer class or None, got {value!r}."
    )


def test_e036_job_type_without_run(monkeypatch):
    # Registration took it; every job of the type then failed with NotImplementedError.
    job_type = job_type_registry.get("limited")
    monkeypatch.delattr(type(job_type), "run")
    message = only("task_ferry.E036")
    assert message.obj is type(job_type)
    assert message.msg == (
        "LimitedJobType does not define run(job, progress), so every job of type 'limited' "
        "would fail with NotImplementedError."
    )
    assert message.hint == ("Define run(self, job, progress) on the class: it does the job's work.")


def test_every_job_type_of_the_test_project_defines_run():
    assert [m for m in plain_checks() if m.id == "task_ferry.E036"] == []


def test_w001_redis_unreachable(ferry):
    ferry(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", PROGRESS_STORE=None)
    message = only("task_ferry.W001")
    assert message.is_serious() is False
    assert "unreachable" in message.msg
    assert "REDIS_URL" in message.hint


@pytest.mark.skipif(
    django_settings.TASK_FERRY.get("REDIS_URL") is None, reason="needs the test Redis"
)
def test_w001_redis_that_refuses_the_database_number(ferry):
    ferry(REDIS_URL="redis://127.0.0.1:6379/99999", PROGRESS_STORE=None)
    message = only("task_ferry.W001")
    assert "refuses the connection" in message.msg
    assert "Start Redis" not in message.hint
    assert "database number" in message.hint


@pytest.mark.skipif(
    django_settings.TASK_FERRY.get("REDIS_URL") is None, reason="needs the test Redis"
)
def test_w001_redis_that_refuses_the_password(ferry):
    # A user the test Redis does not know: it answers, and refuses the credentials.
    ferry(REDIS_URL="redis://nosuchuser:s3cret@127.0.0.1:6379/9", PROGRESS_STORE=None)
    message = only("task_ferry.W001")
    assert "refuses the connection" in message.msg
    assert "password" in message.hint


def test_w001_does_not_show_the_redis_password(ferry):
    port = free_port()
    ferry(REDIS_URL=f"redis://deploy:s3cret@127.0.0.1:{port}/0", PROGRESS_STORE=None)
    message = only("task_ferry.W001")
    assert "s3cret" not in message.msg
    assert f"redis://deploy:***@127.0.0.1:{port}/0" in message.msg


def registered_type(type_name):
    """A valid job type registered the ordinary way."""
    cls = type(
        f"Type_{type_name}",
        (JobType,),
        {"type": type_name, "model_class": ScriptedJob, "run": lambda self, job, progress: None},
    )
    return type(job_type_registry.register(cls))


def test_e030_type_emptied_after_registration(registry_snapshot):
    cls = registered_type("soon_empty")
    cls.type = ""
    message = only("task_ferry.E030")
    assert "registered as 'soon_empty'" in message.msg
    assert message.obj is cls


def test_e030_type_renamed_after_registration(registry_snapshot):
    cls = registered_type("old_name")
    cls.type = "new_name"
    assert "its `type` is now 'new_name'" in only("task_ferry.E030").msg


def test_e031_model_class_not_a_job(registry_snapshot):
    cls = registered_type("bad_model")
    cls.model_class = dict
    message = only("task_ferry.E031")
    assert "must be a subclass of task_ferry.models.Job" in message.msg
    assert message.obj is cls


def test_e032_two_registered_types_with_one_name(registry_snapshot):
    first = registered_type("first_name")
    second = registered_type("second_name")
    second.type = "first_name"
    messages = ferry_messages()
    assert ids(messages) == ["task_ferry.E030", "task_ferry.E032"]
    duplicate = next(m for m in messages if m.id == "task_ferry.E032")
    assert first.__qualname__ in duplicate.msg and second.__qualname__ in duplicate.msg


def test_e032_unregistered_class_reusing_a_name(monkeypatch):
    # A subclass that forgot its own `type` inherits its parent's name.
    clash = type(
        "ClashingJobType",
        (testapp_job_types.LimitedJobType,),
        {"__module__": testapp_job_types.__name__},
    )
    monkeypatch.setattr(testapp_job_types, "ClashingJobType", clash, raising=False)
    message = only("task_ferry.E032")
    assert "'limited'" in message.msg
    assert "ClashingJobType" in message.msg


def test_e033_job_type_without_model_class(monkeypatch):
    orphan = type(
        "OrphanJobType",
        (JobType,),
        {"type": "orphan", "__module__": testapp_job_types.__name__},
    )
    monkeypatch.setattr(testapp_job_types, "OrphanJobType", orphan, raising=False)
    message = only("task_ferry.E033")
    assert "sets type = 'orphan' but has no model_class" in message.msg
    assert message.obj is orphan


def test_base_classes_without_a_name_are_fine():
    # RecordingJobType in tests/testapp/job_types.py has no `type`: a base, not a job type.
    assert testapp_job_types.RecordingJobType.type == ""
    assert ferry_messages() == []


# The URLconf of test_w040_not_reported_without_the_api_in_the_urlconf.
urlpatterns: list = []


@pytest.fixture
def without_rest_framework(monkeypatch):
    from django.apps import apps

    installed = apps.is_installed
    monkeypatch.setattr(
        apps, "is_installed", lambda name: name != "rest_framework" and installed(name)
    )


def test_w040_api_routed_without_rest_framework_installed(without_rest_framework):
    message = only("task_ferry.W040")
    assert "INSTALLED_APPS" in message.msg
    assert message.hint == 'Add "rest_framework" to INSTALLED_APPS.'


def test_w040_not_reported_without_the_api_in_the_urlconf(without_rest_framework, settings):
    settings.ROOT_URLCONF = __name__
    assert "task_ferry.W040" not in {m.id for m in plain_checks()}


class NotAJobPolicy:
    def has_permission(self, request, view):
        return True


def test_e041_api_permission_class_that_is_not_a_job_owner_policy(ferry):
    ferry(API_PERMISSION_CLASS=f"{__name__}.NotAJobPolicy")
    message = only("task_ferry.E041")
    assert "not a subclass of task_ferry.api.permissions.IsJobOwner" in message.msg
    assert "IsJobOwner" in message.hint


@pytest.fixture
def isolation_level(monkeypatch):
    """Sets the jobs' database's ``isolation_level`` option, as DATABASES would; the checks
    read it, no connection is made with it."""
    from django.db import connection

    def configure(level):
        options = {**connection.settings_dict.get("OPTIONS", {}), "isolation_level": level}
        monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)

    return connection, configure


def test_w002_jobs_database_at_repeatable_read_with_a_max_count(isolation_level):
    connection, configure = isolation_level
    if connection.vendor == "mysql":
        configure("repeatable read")
    elif connection.vendor == "postgresql":
        from django.db.backends.postgresql.psycopg_any import IsolationLevel

        configure(IsolationLevel.REPEATABLE_READ)
    else:
        pytest.skip("SQLite has no isolation levels to choose")
    assert "REPEATABLE READ" in only("task_ferry.W002").msg
    assert "max_count" in only("task_ferry.W002").msg


@pytest.mark.skipif(
    django_settings.DATABASES["default"]["ENGINE"] != "django.db.backends.mysql",
    reason="MySQL's isolation_level None: the server's own, REPEATABLE READ by default",
)
def test_w002_mysql_at_the_servers_isolation_level(connection_options):
    connection, configure = connection_options
    # None keeps the server's own level: REPEATABLE READ on a MySQL or MariaDB left as shipped.
    configure(isolation_level=None)
    # Plain `check` (runserver too) makes no query: only the database checks ask.
    assert "task_ferry.W002" not in ids(ferry_messages())
    (message,) = database_messages(connection)
    assert "REPEATABLE READ" in message.msg


def test_the_job_types_check_makes_no_query_whatever_databases_it_is_given(isolation_level):
    # Django 6.1 gives every check all the aliases on a plain `check` (and runserver), where no
    # database may be up: only the database-tagged check may ask it. No test database here.
    from django.db import connections

    from task_ferry.checks import check_job_types

    messages = check_job_types(databases=list(connections))
    assert "task_ferry.W002" not in ids(messages)


def test_w002_not_reported_without_a_max_count(isolation_level, ferry, monkeypatch):
    connection, configure = isolation_level
    if connection.vendor != "mysql":
        pytest.skip("the MySQL spelling of the option")
    configure("repeatable read")
    ferry(MAX_JOBS_PER_USER_PER_TYPE=None)
    for job_type in job_type_registry.all():
        monkeypatch.setattr(type(job_type), "max_count", None)
    assert "task_ferry.W002" not in ids(ferry_messages())


@pytest.fixture
def connection_options(transactional_db, monkeypatch):
    """Connects the jobs' database anew with the given OPTIONS, as a server or an
    init_command would set its sessions up; the next test gets a connection of its own."""
    from django.db import connections

    from task_ferry.models import jobs_database

    connection = connections[jobs_database()]

    def configure(**options):
        connection.close()
        merged = {**connection.settings_dict.get("OPTIONS", {}), **options}
        monkeypatch.setitem(connection.settings_dict, "OPTIONS", merged)

    yield connection, configure
    monkeypatch.undo()
    connection.close()


def database_messages(connection):
    return [m for m in run_checks(databases=[connection.alias]) if m.id == "task_ferry.W002"]


@pytest.mark.direct_connection  # startup options, which a pooler drops
def test_w002_asks_the_database_the_level_its_sessions_get(connection_options):
    """Set outside ``isolation_level``, REPEATABLE READ is found when the checks may query the
    database (migrate, check --database), as Django's own database checks do."""
    connection, configure = connection_options
    if connection.vendor == "postgresql":
        # As ALTER DATABASE ... SET default_transaction_isolation would (not an OPTIONS key
        # Django reads: it keeps the server's level without one).
        configure(options="-c default_transaction_isolation=repeatable\\ read")
    elif connection.vendor == "mysql":
        # Empty, like None, leaves the server's level; the init_command sets it.
        configure(
            isolation_level="",
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        )
    else:
        pytest.skip("SQLite has no isolation levels to choose")
    (message,) = database_messages(connection)
    assert "REPEATABLE READ" in message.msg


def test_w002_asking_the_database_still_finds_the_level_options_set(connection_options):
    # psycopg sets PostgreSQL's as each transaction begins: a session outside one reports the
    # server's default, READ COMMITTED here.
    connection, configure = connection_options
    if connection.vendor == "postgresql":
        from django.db.backends.postgresql.psycopg_any import IsolationLevel

        configure(isolation_level=IsolationLevel.REPEATABLE_READ)
    elif connection.vendor == "mysql":
        configure(isolation_level="repeatable read")
    else:
        pytest.skip("SQLite has no isolation levels to choose")
    (message,) = database_messages(connection)
    assert "REPEATABLE READ" in message.msg


@pytest.mark.skipif(
    django_settings.DATABASES["default"]["ENGINE"] != "django.db.backends.mysql",
    reason="MySQL's isolation_level None: the server's own level",
)
def test_w002_not_reported_where_the_database_says_read_committed(connection_options):
    connection, configure = connection_options
    configure(
        isolation_level=None,
        init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    )
    assert database_messages(connection) == []
