"""The hand-written statements choose the ORM's way wherever theirs would be wrong, and
narrow text to what the job table's character set on MySQL holds."""

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction

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
