"""cleanup_old_jobs() over thousands of expired jobs of several types (bench/cleanup.py does
100,000): batched, bounded in memory and queries, one before_delete per job, live jobs kept."""

from __future__ import annotations

import datetime
import gc
import logging
import os
import threading
import time
import tracemalloc
from collections import Counter

import pytest
from django.db import connection, connections
from django.db.models.signals import post_delete
from django.test import TestCase
from django.test.utils import CaptureQueriesContext

from task_ferry import cleanup
from task_ferry.cleanup import CLEANUP_BATCH_SIZE, MYSQL_LOCK_NAME_LENGTH, mysql_lock_name
from task_ferry.handler import JobHandler, publish
from task_ferry.models import CancelRequest, Heartbeat, Job, JobState
from task_ferry.registry import job_type_registry
from task_ferry.stores.base import get_store
from tests.reliability.bulk import TYPES, bulk_jobs
from tests.testapp.models import Attachment, AttachmentReceipt

pytestmark = pytest.mark.django_db

EXPIRED = 3000


@pytest.fixture
def before_delete_calls(monkeypatch):
    """Counts before_delete per job; the "limited" type's hook raises for every 7th job."""
    calls: Counter[int] = Counter()
    seen_types: Counter[str] = Counter()
    raised: list[int] = []

    def before_delete(self, job):
        calls[job.pk] += 1
        seen_types[type(job).__name__] += 1
        assert isinstance(job, self.model_class)
        if self.type == "limited" and job.pk % 7 == 0:
            raised.append(job.pk)
            raise RuntimeError("before_delete bug")

    for job_type in job_type_registry.all():
        monkeypatch.setattr(type(job_type), "before_delete", before_delete)
    calls.types = seen_types
    calls.raised = raised
    return calls


def survivors(user):
    return {
        "pending": bulk_jobs(40, state=JobState.PENDING, user=user),
        "started": bulk_jobs(40, state=JobState.STARTED, user=user),
        "recent": bulk_jobs(40, state=JobState.FINISHED, age=datetime.timedelta(days=1)),
    }


def test_cleanup_at_scale(user, before_delete_calls, caplog):
    expired = bulk_jobs(EXPIRED // 2, state=JobState.FINISHED, user=user)
    expired += bulk_jobs(EXPIRED // 4, state=JobState.FAILED)
    expired += bulk_jobs(EXPIRED // 4, state=JobState.CANCELLED)
    kept = survivors(user)
    publish(Job.objects.get(pk=expired[0]))

    with (
        CaptureQueriesContext(connection) as queries,
        caplog.at_level(logging.ERROR),
        # The store forgets deleted jobs when their delete commits; the test's never does.
        TestCase.captureOnCommitCallbacks(execute=True),
    ):
        deleted = JobHandler.cleanup_old_jobs()

    assert deleted == EXPIRED
    assert not Job.objects.filter(pk__in=expired).exists()
    assert before_delete_calls == Counter({pk: 1 for pk in expired})
    assert set(before_delete_calls.types) == {"ScriptedJob", "LimitedJob", "ExportJob"}
    # Jobs whose hook raised were logged and deleted all the same.
    assert len(before_delete_calls.raised) > 50
    assert caplog.text.count("before_delete hook") == len(before_delete_calls.raised)
    for state, ids in kept.items():
        assert Job.objects.filter(pk__in=ids).count() == len(ids), state
    assert get_store().read(expired[0]) is None
    # Batched: a handful of queries per batch and type, never one per job; only the savepoint
    # each hook runs in (here, in the test's transaction) is per job.
    batches = EXPIRED // CLEANUP_BATCH_SIZE + 1
    savepoints = [q["sql"] for q in queries if "SAVEPOINT" in q["sql"]]
    # One per hook, and on PostgreSQL one per batch (its transaction, here nested in the test's).
    assert EXPIRED <= sum(sql.startswith("SAVEPOINT") for sql in savepoints) <= EXPIRED + batches
    assert len(queries) - len(savepoints) < batches * len(TYPES) * 8


@pytest.mark.django_db(transaction=True)
def test_cleanup_memory_does_not_grow_with_the_number_of_jobs(user, monkeypatch):
    # Committed, as in production: in a test's transaction the ids of every deleted job would
    # wait for its commit, to be forgotten by the store.
    for job_type in job_type_registry.all():
        monkeypatch.setattr(type(job_type), "before_delete", lambda self, job: None)

    def peak_bytes(count: int) -> int:
        bulk_jobs(count)
        # From empty generations, the collector frees the cleanup's own garbage (reference
        # cycles) at the same points whatever ran before: the peak varied by 40 % without it.
        gc.collect()
        tracemalloc.start()
        try:
            JobHandler.cleanup_old_jobs()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = peak_bytes(CLEANUP_BATCH_SIZE * 2)
    large = peak_bytes(CLEANUP_BATCH_SIZE * 6)
    assert large < small * 1.5, (small, large)


def test_cleanup_leaves_jobs_younger_than_the_expiry_alone(user, before_delete_calls):
    young = bulk_jobs(20, age=datetime.timedelta(days=3))
    old = bulk_jobs(20, age=datetime.timedelta(days=10))

    assert JobHandler.cleanup_old_jobs(older_than=datetime.timedelta(days=5)) == 20
    assert set(Job.objects.values_list("pk", flat=True)) == set(young)
    assert set(before_delete_calls) == set(old)


@pytest.mark.parametrize(
    ("older_than", "error", "message"),
    [
        (datetime.timedelta(days=-1), ValueError, "must be zero or more"),
        (datetime.timedelta.max, ValueError, "reaches back before year 1"),
        (7, TypeError, "must be a datetime.timedelta, got int 7"),
    ],
)
def test_an_age_below_zero_or_not_a_timedelta_is_refused_and_deletes_nothing(
    user, before_delete_calls, older_than, error, message
):
    """A negative age (a sign slip) deleted every ended job, the one just finished too."""
    ended = bulk_jobs(5, age=datetime.timedelta(minutes=1))
    with pytest.raises(error, match=message):
        JobHandler.cleanup_old_jobs(older_than=older_than)
    assert set(Job.objects.values_list("pk", flat=True)) == set(ended)
    assert not before_delete_calls


def test_cleanup_removes_heartbeats_and_cancel_requests_left_by_deleted_jobs(user):
    """A worker's beat (or a cancel recorded while the store was down) that read a job just
    before its delete writes its row just after: no foreign-key constraint refuses it, and the
    row stayed for good."""
    running = bulk_jobs(2, state=JobState.STARTED, user=user)
    gone = max(Job.objects.values_list("pk", flat=True)) + 1000
    Heartbeat.objects.create(job_id=gone, worker="a worker")
    CancelRequest.objects.create(job_id=gone)
    Heartbeat.objects.create(job_id=running[0], worker="a worker")
    CancelRequest.objects.create(job_id=running[1])

    JobHandler.cleanup_old_jobs()

    assert list(Heartbeat.objects.values_list("job_id", flat=True)) == [running[0]]
    assert list(CancelRequest.objects.values_list("job_id", flat=True)) == [running[1]]


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite allows one writer at a time")
@pytest.mark.django_db(transaction=True)
def test_two_cleanups_at_once_call_before_delete_once_per_job(user, monkeypatch):
    # Cron and Celery beat both scheduled, say: the second finds the first running and stops.
    calls: Counter[int] = Counter()
    first_hook = threading.Event()

    def before_delete(self, job):
        calls[job.pk] += 1
        first_hook.set()
        time.sleep(0.002)

    for job_type in job_type_registry.all():
        monkeypatch.setattr(type(job_type), "before_delete", before_delete)
    expired = bulk_jobs(300)
    results: list[int] = []

    def cleanup():
        try:
            results.append(JobHandler.cleanup_old_jobs())
        finally:
            connection.close()

    first = threading.Thread(target=cleanup)
    first.start()
    assert first_hook.wait(10)
    cleanup()  # meanwhile, on this thread's own connection
    first.join(30)

    assert sorted(results) == [0, 300]
    assert calls == Counter({pk: 1 for pk in expired})
    assert not Job.objects.filter(pk__in=expired).exists()
    # The lock was released: the next cleanup runs.
    more = bulk_jobs(10)
    assert JobHandler.cleanup_old_jobs() == len(more)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's lock, held for the run")
def test_on_sqlite_a_cleanup_stops_while_another_holds_the_lock(user, before_delete_calls, caplog):
    # The other cleanup in a process of its own: test_sqlite_locking.py. Here, in this one: on
    # the tests' database in memory, or on a file with TASK_FERRY_TEST_SQLITE.
    expired = bulk_jobs(5)
    with cleanup.run_lock("task_ferry.cleanup_old_jobs") as other, other.batch() as alone:
        assert alone
        with caplog.at_level(logging.WARNING):
            assert JobHandler.cleanup_old_jobs() == 0
    assert "another cleanup is running; this one stops" in caplog.text
    assert not before_delete_calls
    assert Job.objects.filter(pk__in=expired).count() == len(expired)
    # Released with the other's end.
    assert JobHandler.cleanup_old_jobs() == len(expired)
    assert before_delete_calls == Counter({pk: 1 for pk in expired})


def test_the_sqlite_cleanup_lock_file_is_one_per_database_file_whatever_its_name(
    tmp_path, monkeypatch
):
    name = "task_ferry.cleanup_old_jobs"
    database = tmp_path / "data" / "db.sqlite3"
    database.parent.mkdir()
    (tmp_path / "link").symlink_to(database.parent)
    monkeypatch.chdir(tmp_path)
    expected = f"{os.path.realpath(database)}-{name}.lock"
    for spelling in (
        database,
        str(database),
        "data/db.sqlite3",
        "link/db.sqlite3",
        f"file:{database}?mode=rw",
        "file:data/db%2Esqlite3",
    ):
        assert cleanup.sqlite_lock_path(name, spelling) == expected, spelling
    assert cleanup.sqlite_lock_path(name, tmp_path / "other.sqlite3") != expected


def test_the_cleanup_lock_name_fits_mysql_8_whatever_the_database_name():
    # MySQL 8 refuses GET_LOCK() names over 64 characters; database names may have 64.
    name = "task_ferry.cleanup_old_jobs"
    assert mysql_lock_name(name, "shop") == "task_ferry.cleanup_old_jobs:shop"
    long_names = ["d" * 64, "d" * 63 + "e"]
    locks = [mysql_lock_name(name, database) for database in long_names]
    assert all(len(lock) == MYSQL_LOCK_NAME_LENGTH for lock in locks)
    assert all(lock.startswith(f"{name}:") for lock in locks)
    # Two databases of one server still get locks of their own.
    assert locks[0] != locks[1]


@pytest.mark.skipif(connection.vendor != "mysql", reason="MariaDB's GET_LOCK()")
def test_mariadb_cleanup_waits_for_one_of_an_earlier_release_whatever_the_database_name(
    user, monkeypatch
):
    # MariaDB takes lock names of 192 characters: its cleanup lock is still named
    # "name:database" as in earlier releases, so a cleanup from either side of a deploy stops
    # while the other runs.
    if connection.display_name != "MariaDB":
        pytest.skip("MySQL 8 takes 64 characters: the name was shortened for it")
    bulk_jobs(3)
    database = "d" * 64
    earlier_release = connections.create_connection(connection.alias)
    try:
        earlier_release.ensure_connection()
        with earlier_release.cursor() as cursor:
            cursor.execute("SELECT GET_LOCK(%s, 0)", [f"task_ferry.cleanup_old_jobs:{database}"])
            assert cursor.fetchone()[0] == 1
        monkeypatch.setitem(connection.settings_dict, "NAME", database)
        assert JobHandler.cleanup_old_jobs() == 0
    finally:
        earlier_release.close()


def advisory_locks_held(settings_dict: dict) -> int:
    """Advisory locks held in the test database, asked of the server directly."""
    import psycopg

    with psycopg.connect(
        host=settings_dict["HOST"] or "127.0.0.1",
        port=settings_dict["PORT"] or 5432,
        user=settings_dict["USER"] or "postgres",
        dbname=settings_dict["NAME"],
        autocommit=True,
    ) as direct:
        row = direct.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.django_db(transaction=True)
def test_behind_pgbouncer_in_transaction_mode_a_cleanup_leaves_no_lock_behind(
    user, pgbouncer, monkeypatch
):
    # Another client of the pooler, busy while the cleanup runs, takes the server connection
    # the cleanup's statements ran on until then. A session-level lock taken there would be
    # released on another server connection, which does not hold it: it would stay taken, and
    # let later cleanups through or turn them away depending on where they land.
    import psycopg

    direct = dict(connection.settings_dict)
    other_client_done = threading.Event()

    def other_client():
        with psycopg.connect(
            host="127.0.0.1",
            port=pgbouncer.port,
            user=direct["USER"] or "postgres",
            dbname=direct["NAME"],
            autocommit=True,
        ) as pooled:
            pooled.execute("SELECT pg_sleep(0.5)")
        other_client_done.set()

    def before_delete(self, job):
        if not other_client_done.is_set() and not getattr(before_delete, "started", False):
            before_delete.started = True
            threading.Thread(target=other_client).start()
            time.sleep(0.2)  # until it has its server connection

    for job_type in job_type_registry.all():
        monkeypatch.setattr(type(job_type), "before_delete", before_delete)
    expired = bulk_jobs(20)
    assert JobHandler.cleanup_old_jobs() == len(expired)
    assert other_client_done.wait(10)
    direct.update(PORT=pgbouncer.server_port)
    assert advisory_locks_held(direct) == 0
    # The next cleanup runs, whichever server connection it lands on.
    more = bulk_jobs(5)
    assert JobHandler.cleanup_old_jobs() == len(more)
    assert not Job.objects.filter(pk__in=expired + more).exists()


@pytest.mark.django_db(transaction=True)
def test_a_before_delete_whose_query_fails_does_not_stop_the_others(user, monkeypatch, caplog):
    # On PostgreSQL the hooks run in the batch's transaction, each in a savepoint: without it,
    # the failed query would abort the transaction, and with it the batch's delete.
    def before_delete(self, job):
        if job.pk % 3 == 0:
            with connection.cursor() as cursor:
                cursor.execute("SELECT * FROM task_ferry_no_such_table")
        Job.objects.filter(pk=job.pk).update(progress_state="cleaned up")

    for job_type in job_type_registry.all():
        monkeypatch.setattr(type(job_type), "before_delete", before_delete)
    expired = bulk_jobs(30)
    with caplog.at_level(logging.ERROR):
        assert JobHandler.cleanup_old_jobs() == len(expired)
    assert not Job.objects.filter(pk__in=expired).exists()
    assert caplog.text.count("before_delete hook") == sum(pk % 3 == 0 for pk in expired)


BUDGET = 0.2
HOOK_SECONDS = 0.03


@pytest.fixture
def slow_hooks(monkeypatch):
    """The "limited" type's before_delete takes HOOK_SECONDS; cleanups get a transaction budget
    of BUDGET seconds. Records, per hooked job, the transaction of each call of its hook and how
    many seconds into it the call began, and per deleted job the transactions it was deleted
    in."""
    hooks: dict[int, list[tuple[int, float]]] = {}
    deletes: dict[int, set[int]] = {}

    def transaction_and_seconds_into_it() -> tuple[int, float]:
        with connection.cursor() as cursor:
            # now() is when the transaction began; txid_current() is the top-level one's.
            cursor.execute("SELECT txid_current(), EXTRACT(EPOCH FROM clock_timestamp() - now())")
            txid, into = cursor.fetchone()
        return int(txid), float(into)

    def before_delete(self, job):
        hooks.setdefault(job.pk, []).append(transaction_and_seconds_into_it())
        time.sleep(HOOK_SECONDS)

    def deleted(sender, instance, **kwargs):
        if isinstance(instance, Job):
            deletes.setdefault(instance.pk, set()).add(transaction_and_seconds_into_it()[0])

    monkeypatch.setattr(cleanup, "CLEANUP_TRANSACTION_SECONDS", BUDGET)
    monkeypatch.setattr(type(job_type_registry.get("limited")), "before_delete", before_delete)
    post_delete.connect(deleted, weak=False, dispatch_uid="slow_hooks")
    try:
        yield hooks, deletes
    finally:
        post_delete.disconnect(dispatch_uid="slow_hooks")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a batch is a transaction there")
@pytest.mark.django_db(transaction=True)
def test_slow_hooks_are_spread_over_transactions_none_open_much_past_the_budget(user, slow_hooks):
    # One batch of 500 was one transaction, open for 500 hooks (minutes with hooks that remove
    # files from S3), holding back vacuum in the whole database meanwhile.
    hooks, deletes = slow_hooks
    expired = bulk_jobs(120)  # 30 of them "limited", the others of types without the hook
    limited = set(Job.objects.filter(pk__in=expired, type="limited").values_list("pk", flat=True))

    assert JobHandler.cleanup_old_jobs() == len(expired)

    assert not Job.objects.filter(pk__in=expired).exists()
    assert {pk: len(calls) for pk, calls in hooks.items()} == {pk: 1 for pk in limited}
    # Each job deleted once (its base row and its own, in one transaction), its hook in it.
    assert {pk: len(transactions) for pk, transactions in deletes.items()} == {
        pk: 1 for pk in expired
    }
    assert all({hooks[pk][0][0]} == deletes[pk] for pk in limited)
    by_transaction: dict[int, list[float]] = {}
    for (txid, into), *_ in hooks.values():
        by_transaction.setdefault(txid, []).append(into)
    # At most BUDGET / HOOK_SECONDS + 1 hooks in each.
    assert len(by_transaction) >= len(limited) * HOOK_SECONDS / (BUDGET + HOOK_SECONDS)
    # No hook starts past the budget but a transaction's first (loading the batch may have
    # taken it); a margin for the moments between the cleanup's look at the clock and the
    # hook's. Before, the last hook began 0.9 s into the one transaction.
    for starts in by_transaction.values():
        assert all(start < BUDGET * 1.5 for start in sorted(starts)[1:]), starts


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a batch is a transaction there")
@pytest.mark.django_db(transaction=True)
def test_a_job_kept_in_a_batch_cut_short_by_slow_hooks_is_logged_once(user, slow_hooks, caplog):
    hooks, _ = slow_hooks
    expired = bulk_jobs(30, types=("limited",))
    kept = expired[20]
    # Its attachment is deleted with it, but a receipt keeps the attachment.
    AttachmentReceipt.objects.create(attachment=Attachment.objects.create(job_id=kept))

    with caplog.at_level(logging.WARNING, logger="task_ferry"):
        assert JobHandler.cleanup_old_jobs() == len(expired) - 1

    assert list(Job.objects.filter(pk__in=expired).values_list("pk", flat=True)) == [kept]
    assert sorted(hooks) == sorted(set(expired) - {kept})
    assert len({calls[0][0] for calls in hooks.values()}) > 1
    # Each batch cut short after the job had found it kept, and would say so again.
    assert [m for m in caplog.messages if "is kept" in m] == [
        f"cleanup_old_jobs: job {kept} is kept: Cannot delete some instances of model "
        "'LimitedJob' because they are referenced through protected foreign keys: "
        "'Attachment.job'."
    ]
