"""The hand-written statements choose the ORM's way wherever theirs would be wrong, and
narrow text to what the job table's character set on MySQL holds."""

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from task_ferry import statements
from task_ferry.models import Job, JobState
from tests.testapp.models import ScriptedJob

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the one-statement paths are PostgreSQL's"
)


class ScriptedJobsReadFromAReplica:
    def db_for_read(self, model, **hints):
        return "replica" if model is ScriptedJob else None


def new_job():
    return ScriptedJob(
        type="scripted", content_type=ContentType.objects.get_for_model(ScriptedJob), steps=1
    )


@postgresql_only
def test_reads_routed_to_a_replica_keep_the_one_statement_insert_and_the_fused_load(
    transactional_db, settings
):
    settings.DATABASE_ROUTERS = [f"{__name__}.ScriptedJobsReadFromAReplica"]
    job = new_job()
    assert statements.insert_job(job)
    # The worker loads the job where it was written: a replica may not have it yet.
    started = statements.start_and_load(job.pk, "scripted", ScriptedJob)
    assert started is not None
    assert (started.pk, started.state, started._state.db) == (job.pk, JobState.STARTED, "default")
    assert Job.objects.get(pk=job.pk).state == JobState.STARTED


@postgresql_only
def test_inside_a_transaction_both_leave_the_work_to_the_orm(transactional_db):
    job = new_job()
    with transaction.atomic():
        assert not statements.insert_job(job)
        assert job.pk is None
        job.save()
        assert statements.start_and_load(job.pk, "scripted", ScriptedJob) is None
    assert statements.compare_and_set(job.pk, [JobState.PENDING], {"state": JobState.CANCELLED})
    assert not statements.compare_and_set(job.pk, [JobState.PENDING], {"state": JobState.FAILED})
    assert Job.objects.get(pk=job.pk).state == JobState.CANCELLED


TEXT = "€ naïve → 报告 Отчёт \U0001f600"


@pytest.mark.parametrize(
    ("charset", "stored"),
    [
        ("utf8mb4", TEXT),
        ("utf8mb3", "€ naïve → 报告 Отчёт \ufffd"),
        ("latin1", "€ naïve ? ?? ????? ?"),
        ("cp1251", "€ na?ve ? ?? Отчёт ?"),
        # A character set with no codec here: ASCII, which every one holds.
        ("armscii8", "? na?ve ? ?? ????? ?"),
    ],
)
def test_text_is_narrowed_to_what_a_mysql_character_set_holds(charset, stored):
    assert statements.fit_to_charset(TEXT, charset) == stored


@pytest.mark.skipif(connection.vendor != "mysql", reason="MySQL's character sets")
@pytest.mark.parametrize(
    "charset",
    sorted(statements.CHARSET_CODECS.keys() | statements.BMP_ONLY | statements.WHOLE_UNICODE),
)
def test_a_column_in_each_character_set_holds_every_text_narrowed_to_it(db, charset):
    # Every character of the BMP and some beyond: a codec that kept one the character set
    # lacks would have the retried UPDATE refused again, and the job left started.
    text = "".join(chr(i) for i in range(1, 0x10000) if not 0xD800 <= i < 0xE000)
    fitted = statements.fit_to_charset(text + "\U0001f600\U00020000\U0010fffd", charset)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE narrowed (text LONGTEXT CHARACTER SET {charset})")
        try:
            cursor.execute("INSERT INTO narrowed (text) VALUES (%s)", [fitted])
            cursor.execute("SELECT text FROM narrowed")
            assert cursor.fetchone()[0] == fitted
        finally:
            cursor.execute("DROP TEMPORARY TABLE narrowed")


def prepared_statements_of_this_session():
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


@pytest.fixture
def prepare_threshold(transactional_db):
    """Set the connection's psycopg ``prepare_threshold``, as a project's
    ``DATABASES[...]["OPTIONS"]`` does; the connection is closed afterwards, so later tests get
    one as configured, without this session's prepared statements."""
    connection.ensure_connection()
    configured = connection.connection.prepare_threshold

    def set_to(threshold):
        connection.connection.prepare_threshold = threshold

    yield set_to
    connection.connection.prepare_threshold = configured
    connection.close()


@postgresql_only
def test_a_connection_that_allows_prepared_statements_prepares_the_three_of_every_job(
    prepare_threshold,
):
    from task_ferry.handler import JobHandler

    prepare_threshold(0)
    job = JobHandler.create_and_start(None, "scripted", steps=3)  # run at once: immediate executor
    job.refresh_from_db()
    assert job.state == JobState.FINISHED
    prepared = prepared_statements_of_this_session()
    insert = [s for s in prepared if s.startswith("WITH new_job AS (INSERT INTO")]
    updates = [s for s in prepared if s.startswith('UPDATE "task_ferry_job"')]
    start = [s for s in updates if '"started_at" = $' in s]
    finish = [s for s in updates if '"finished_at" = $' in s]
    assert (len(insert), len(start), len(finish), len(prepared)) == (1, 1, 1, 3), prepared

    # Prepared, they go on working: a second job reuses the three statements.
    second = JobHandler.create_and_start(None, "scripted", steps=2)
    second.refresh_from_db()
    assert second.state == JobState.FINISHED
    assert sorted(prepared_statements_of_this_session()) == sorted(prepared)


@postgresql_only
def test_while_queries_are_logged_the_statements_are_logged_with_their_text(prepare_threshold):
    """``DEBUG`` and ``CaptureQueriesContext`` read a query's text from the cursor Django
    made; there the statements keep Django's cursor, unprepared."""
    from task_ferry.handler import JobHandler

    prepare_threshold(0)
    with CaptureQueriesContext(connection) as captured:
        job = JobHandler.create_and_start(None, "scripted", steps=3)
    logged = [q["sql"] for q in captured.captured_queries]
    assert any(sql.startswith("WITH new_job AS (INSERT INTO") for sql in logged), logged
    assert any('"finished_at" = \'' in sql for sql in logged if sql.startswith("UPDATE")), logged
    job.refresh_from_db()
    assert job.state == JobState.FINISHED


@pytest.mark.direct_connection  # this session's prepared statements
@postgresql_only
def test_prepared_statements_stay_off_where_django_turned_them_off(prepare_threshold):
    """Django's default (``prepare_threshold`` None): a pooler in transaction mode may hand a
    session's prepared statement to another session, so none of ours is prepared."""
    from task_ferry.handler import JobHandler

    prepare_threshold(None)
    job = JobHandler.create_and_start(None, "scripted", steps=3)
    job.refresh_from_db()
    assert job.state == JobState.FINISHED
    assert prepared_statements_of_this_session() == []
