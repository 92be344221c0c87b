"""The job admin at a million rows: queries and time per page, against Django's stock choices.

Fills a PostgreSQL database of its own (TASK_FERRY_TEST_DB_NAME, default tf_bench_admin) with
--rows jobs once (kept for later runs), then times each admin page a few times. "stock" is the
same admin with Django's defaults: exact COUNT(*) of the filtered and the whole table, and the
model's ordering (-created_at, -id).

    PYTHONPATH=$PWD TASK_FERRY_TEST_DB_NAME=tf_dx python bench/admin_list.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ.setdefault("TASK_FERRY_TEST_DB_NAME", "tf_bench_admin")
os.environ.setdefault("TASK_FERRY_TEST_STORE", "cache")

import django
import psycopg


def create_database(name: str) -> None:
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            c.execute(f'CREATE DATABASE "{name}"')


create_database(os.environ["TASK_FERRY_TEST_DB_NAME"])
django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.contenttypes.models import ContentType  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.paginator import Paginator  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.urls import reverse  # noqa: E402

from task_ferry.admin import JobAdmin  # noqa: E402
from task_ferry.models import Job  # noqa: E402
from tests.testapp.models import LimitedJob, ScriptedJob  # noqa: E402

USERS = 1000


def fill(rows: int) -> None:
    have = Job.objects.count()
    if have >= rows:
        print(f"reusing {have} jobs already in {connection.settings_dict['NAME']}")
        return
    User = get_user_model()
    User.objects.bulk_create(
        [User(username=f"user{i}", email=f"user{i}@example.com") for i in range(USERS)],
        ignore_conflicts=True,
    )
    scripted = ContentType.objects.get_for_model(ScriptedJob).pk
    limited = ContentType.objects.get_for_model(LimitedJob).pk
    missing = rows - have
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SELECT min(id), count(*) FROM auth_user WHERE username LIKE 'user%%'")
        first_user, user_count = cursor.fetchone()
        # One job per second of history, newest last; 1 in 10 is a "limited" job, 1 in 7 a
        # system job, a few hundred live.
        cursor.execute(
            f"""
            INSERT INTO task_ferry_job (content_type_id, type, user_id, state,
                progress_percentage, progress_state, error, human_readable_error, traceback,
                created_at, updated_at, started_at, finished_at)
            SELECT
                CASE WHEN g % 10 = 0 THEN {limited} ELSE {scripted} END,
                CASE WHEN g % 10 = 0 THEN 'limited' ELSE 'scripted' END,
                CASE WHEN g % 7 = 0 THEN NULL ELSE {first_user} + g % {user_count} END,
                CASE WHEN g > {rows - 300} THEN (ARRAY['pending', 'started'])[1 + g % 2]
                     ELSE (ARRAY['finished', 'finished', 'finished', 'failed', 'cancelled'])
                          [1 + g % 5] END,
                g % 101, '', '', '', '',
                ts, ts, ts + interval '1 second', ts + interval '5 seconds'
            FROM generate_series({have + 1}, {rows}) AS g,
                 LATERAL (SELECT now() - ({rows} - g) * interval '1 second' AS ts) AS t
            """
        )
        cursor.execute(
            "INSERT INTO testapp_scriptedjob (job_ptr_id, steps, tick_delay, block_for,"
            " lock_own_row, marker, result) SELECT id, 10, 0, 0, false, '', ''"
            " FROM task_ferry_job WHERE type = 'scripted'"
            " AND id NOT IN (SELECT job_ptr_id FROM testapp_scriptedjob)"
        )
        cursor.execute(
            "INSERT INTO testapp_limitedjob (job_ptr_id, label) SELECT id, ''"
            " FROM task_ferry_job WHERE type = 'limited'"
            " AND id NOT IN (SELECT job_ptr_id FROM testapp_limitedjob)"
        )
        cursor.execute(
            "UPDATE task_ferry_job SET started_at = NULL, finished_at = NULL"
            " WHERE state = 'pending'"
        )
        cursor.execute("UPDATE task_ferry_job SET finished_at = NULL WHERE state = 'started'")
        cursor.execute("ANALYZE")
    print(f"inserted {missing} jobs in {time.perf_counter() - started:.1f} s")


def measure(
    client: Client, url: str, params: dict[str, str], repeat: int
) -> tuple[int, float, float]:
    """Queries per request, and median milliseconds of the whole request and of its SQL."""
    client.get(url, params)  # warm caches, as a running site has
    timings = []
    sql_timings = []
    queries = 0
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as captured:
            started = time.perf_counter()
            response = client.get(url, params)
            timings.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, params, response.status_code)
        queries = len(captured.captured_queries)
        sql_timings.append(sum(float(q["time"]) for q in captured.captured_queries))
    return queries, statistics.median(timings) * 1000, statistics.median(sql_timings) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock comparison")
    args = parser.parse_args()

    call_command("migrate", verbosity=0)
    fill(args.rows)
    admin_user, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(admin_user)
    list_url = reverse("admin:task_ferry_job_changelist")
    some_job = Job.objects.order_by("-id").values_list("pk", flat=True)[5000]
    pages: list[tuple[str, str, dict[str, str]]] = [
        ("list, page 1", list_url, {}),
        ("list, page 50", list_url, {"p": "50"}),
        ("state = failed", list_url, {"state": "failed"}),
        ("state = pending", list_url, {"state": "pending"}),
        ("type = limited", list_url, {"type": "limited"}),
        ("age: last 24 hours", list_url, {"age": "24h"}),
        ("age: older than 7 days", list_url, {"age": "gt7d"}),
        ("search: job id", list_url, {"q": str(some_job)}),
        ("search: username", list_url, {"q": "user42@"}),
        ("search: type name", list_url, {"q": "limited"}),
        ("sorted by created, oldest first", list_url, {"o": "6"}),
        ("detail page", reverse("admin:task_ferry_job_change", args=[some_job]), {}),
    ]
    print(f"\n{Job.objects.count()} jobs; median of {args.repeat} requests\n")
    header = f"{'page':34} {'queries':>7} {'ms':>7} {'sql ms':>7}"
    if not args.no_stock:
        header += f" | {'stock q':>7} {'ms':>7} {'sql ms':>7} {'sql ratio':>9}"
    print(header)
    for label, url, params in pages:
        queries, ms, sql_ms = measure(client, url, params, args.repeat)
        line = f"{label:34} {queries:7d} {ms:7.1f} {sql_ms:7.1f}"
        if not args.no_stock and url == list_url:
            stock = StockAdmin()
            try:
                stock_queries, stock_ms, stock_sql = measure(client, url, params, args.repeat)
            finally:
                stock.restore()
            ratio = stock_sql / max(sql_ms, 0.1)
            line += f" | {stock_queries:7d} {stock_ms:7.1f} {stock_sql:7.1f} {ratio:8.1f}x"
        print(line)


class StockAdmin:
    """Switches JobAdmin to Django's defaults until ``restore()``."""

    NAMES = ("paginator", "show_full_result_count", "ordering")

    def __init__(self) -> None:
        self.saved = {name: JobAdmin.__dict__[name] for name in self.NAMES}
        JobAdmin.paginator = Paginator
        JobAdmin.show_full_result_count = True
        JobAdmin.ordering = None

    def restore(self) -> None:
        for name, value in self.saved.items():
            setattr(JobAdmin, name, value)


if __name__ == "__main__":
    main()
