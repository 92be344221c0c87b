"""Tests of the example app: ``python example/manage.py test exports`` (``make test-example``)."""

import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.exceptions import MiddlewareNotUsed
from django.test import SimpleTestCase, TestCase, override_settings
from project.demo_login import DemoLoginMiddleware

from task_ferry.exceptions import JobCancelled
from task_ferry.handler import JobHandler
from task_ferry.models import JobState
from task_ferry.progress import Progress

from .job_types import ExportFailed, ExportJobType
from .management.commands import runexample
from .models import ExportJob

MANAGE_PY = Path(__file__).resolve().parents[1] / "manage.py"
IMMEDIATE = {
    "EXECUTOR": "task_ferry.executors.immediate.ImmediateExecutor",
    "CACHE_ALIAS": "default",
}


class ExportTestCase(TestCase):
    def setUp(self) -> None:
        export_dir = tempfile.TemporaryDirectory()
        self.addCleanup(export_dir.cleanup)
        self.export_dir = Path(export_dir.name)
        overrides = override_settings(EXPORT_DIR=self.export_dir, TASK_FERRY=IMMEDIATE)
        overrides.enable()
        self.addCleanup(overrides.disable)
        self.user = get_user_model().objects.create_user("ada")
        # The progress store outlives the test's rolled-back rows, whose ids come again.
        self.addCleanup(cache.clear)


class ExportJobTypeTests(ExportTestCase):
    def test_export_writes_every_row_to_a_gzip_csv(self) -> None:
        job = JobHandler.create_and_start(self.user, "example_export", rows=250, seconds=0)
        job.refresh_from_db()
        self.assertEqual(job.state, JobState.FINISHED)
        self.assertEqual(job.progress_percentage, 100)
        path = Path(job.output_path)
        self.assertEqual(path, self.export_dir / f"export-{job.pk}.csv.gz")
        self.assertEqual(job.output_size, path.stat().st_size)
        lines = gzip.decompress(path.read_bytes()).decode().splitlines()
        self.assertEqual(lines[0], "id,date,region,product,quantity,amount")
        self.assertEqual(len(lines), 251)
        self.assertEqual([line.split(",")[0] for line in lines[1:4]], ["1", "2", "3"])

    def test_stages_fill_the_bar_by_their_weights(self) -> None:
        job = make_job(self.user, rows=100)
        reached: dict[str, int] = {}

        def record(node: Progress) -> None:
            reached[node._root.state.split(":")[0]] = node._root.percentage

        progress = Progress()
        with on_increment(record):
            ExportJobType().run(job, progress)
        self.assertEqual(reached["Collecting rows"], 20)
        self.assertEqual(reached["Writing CSV"], 80)
        self.assertEqual(reached["Checksumming the file"], 95)
        self.assertEqual(progress.percentage, 100)

    def test_invalid_values_are_refused_before_a_row_exists(self) -> None:
        from task_ferry.exceptions import InvalidJobValues

        with self.assertRaises(InvalidJobValues) as caught:
            JobHandler.create_and_start(self.user, "example_export", rows=0, seconds=1)
        self.assertIn("rows", caught.exception.errors)
        self.assertFalse(ExportJob.objects.exists())

    def test_cancelled_export_leaves_no_file(self) -> None:
        job = make_job(self.user, rows=300)
        progress = Progress()
        job_type = ExportJobType()
        ticks = 0

        def cancel_during_the_csv_stage(node: Progress) -> None:
            nonlocal ticks
            ticks += 1
            if ticks == 40:
                node.request_cancel()

        with on_increment(cancel_during_the_csv_stage), self.assertRaises(JobCancelled):
            job_type.run(job, progress)
        self.assertTrue((self.export_dir / f"export-{job.pk}.csv.gz.part").exists())
        job_type.on_cancelled(job)
        self.assertEqual(list(self.export_dir.iterdir()), [])


class FailAtRowTests(ExportTestCase):
    def test_export_fails_at_the_row_asked_for_and_leaves_no_file(self) -> None:
        # The immediate executor raises the job's exception once the job is marked failed.
        with self.assertRaises(ExportFailed), self.assertLogs("task_ferry", "ERROR"):
            JobHandler.create_and_start(
                self.user, "example_export", rows=300, seconds=0, fail_at_row=120
            )
        job = ExportJob.objects.get()
        self.assertEqual(job.state, JobState.FAILED)
        self.assertEqual(job.human_readable_error, "The export stopped at row 120, as you asked.")
        self.assertTrue(job.error.startswith("ExportFailed: "), job.error)
        self.assertEqual(list(self.export_dir.iterdir()), [])

    def test_on_error_removes_the_rows_written_before_the_failure(self) -> None:
        job = make_job(self.user, rows=300, fail_at_row=120)
        job_type = ExportJobType()
        with self.assertRaises(ExportFailed) as caught:
            job_type.run(job, Progress())
        part = self.export_dir / f"export-{job.pk}.csv.gz.part"
        # The header and rows 1 to 119.
        self.assertEqual(len(gzip.decompress(part.read_bytes()).splitlines()), 120)
        job_type.on_error(job, caught.exception)
        self.assertEqual(list(self.export_dir.iterdir()), [])

    def test_a_row_past_the_end_is_refused(self) -> None:
        from task_ferry.exceptions import InvalidJobValues

        for fail_at_row in (0, 11):
            with (
                self.subTest(fail_at_row=fail_at_row),
                self.assertRaises(InvalidJobValues) as caught,
            ):
                JobHandler.create_and_start(
                    self.user, "example_export", rows=10, seconds=0, fail_at_row=fail_at_row
                )
            self.assertIn("fail_at_row", caught.exception.errors)
        self.assertFalse(ExportJob.objects.exists())


class ApiTests(ExportTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.client.force_login(self.user)

    def test_a_finished_export_shows_a_download_url_and_not_its_path(self) -> None:
        created = self.client.post(
            "/api/jobs/", {"type": "example_export", "rows": 5, "seconds": 0}, "application/json"
        )
        self.assertEqual(created.status_code, 201, created.content)
        job_id = created.json()["id"]
        for response in (created, self.client.get(f"/api/jobs/{job_id}/")):
            data = response.json()
            self.assertEqual(data["state"], "finished")
            self.assertEqual(data["download_url"], f"/exports/{job_id}/download/")
            self.assertGreater(data["output_size"], 0)
            self.assertNotIn("output_path", data)
            self.assertNotIn(str(self.export_dir), response.content.decode())
        listed = self.client.get("/api/jobs/").content.decode()
        self.assertIn(f"/exports/{job_id}/download/", listed)
        self.assertNotIn(str(self.export_dir), listed)
        self.assertEqual(self.client.get(data["download_url"]).status_code, 200)

    def test_an_export_not_finished_has_no_download_url(self) -> None:
        job = make_job(self.user, rows=5)
        self.assertIsNone(self.client.get(f"/api/jobs/{job.pk}/").json()["download_url"])

    def test_output_path_cannot_be_set(self) -> None:
        response = self.client.post(
            "/api/jobs/",
            {"type": "example_export", "rows": 5, "output_path": "/etc/passwd"},
            "application/json",
        )
        self.assertEqual(response.status_code, 400)
        self.assertIn("output_path", response.json())

    def test_a_failed_export_shows_why(self) -> None:
        with self.assertLogs("task_ferry", "ERROR"):
            response = self.client.post(
                "/api/jobs/",
                {"type": "example_export", "rows": 50, "seconds": 0, "fail_at_row": 7},
                "application/json",
            )
        self.assertEqual(response.status_code, 201, response.content)
        data = response.json()
        self.assertEqual(data["state"], "failed")
        self.assertEqual(data["fail_at_row"], 7)
        self.assertEqual(data["human_readable_error"], "The export stopped at row 7, as you asked.")
        self.assertIsNone(data["download_url"])

    def test_a_row_past_the_end_gets_400(self) -> None:
        response = self.client.post(
            "/api/jobs/",
            {"type": "example_export", "rows": 50, "seconds": 0, "fail_at_row": 51},
            "application/json",
        )
        self.assertEqual(response.status_code, 400)
        self.assertIn("fail_at_row", response.json())

    def test_schema_shows_the_download_url_and_not_the_path(self) -> None:
        response = self.client.get("/api/jobs/schema/", HTTP_ACCEPT="application/json")
        self.assertEqual(response.status_code, 200)
        components = response.json()["components"]["schemas"]
        shown = components["ExampleExportJob"]["properties"]
        self.assertEqual(
            shown["download_url"],
            {
                "type": "string",
                "readOnly": True,
                "nullable": True,
                "description": "Null until the export has finished.",
            },
        )
        self.assertNotIn("output_path", shown)
        self.assertEqual(
            set(components["ExampleExportJobCreate"]["properties"]),
            {"type", "rows", "seconds", "fail_at_row"},
        )


class PageTests(ExportTestCase):
    def test_job_list_costs_four_queries_for_fifty_jobs(self) -> None:
        for _ in range(55):
            JobHandler.create_and_start(self.user, "example_export", rows=5, seconds=0)
        self.client.force_login(self.user)
        self.client.get("/")
        # Session, user, the page of jobs, their export rows.
        with self.assertNumQueries(4):
            response = self.client.get("/")
        self.assertEqual(response.content.count(b"<task-ferry-progress"), 50)
        self.assertContains(response, 'state="finished"', count=50)
        self.assertContains(response, "no-sse", count=50)
        self.assertIn("csrftoken", response.cookies)

    def test_a_failed_export_shows_why_after_a_reload(self) -> None:
        with self.assertRaises(ExportFailed), self.assertLogs("task_ferry", "ERROR"):
            JobHandler.create_and_start(
                self.user, "example_export", rows=50, seconds=0, fail_at_row=7
            )
        self.client.force_login(self.user)
        response = self.client.get("/")
        # The bar shows it; it makes no request for an ended job.
        self.assertContains(
            response, 'human-readable-error="The export stopped at row 7, as you asked."'
        )

    def test_a_failed_export_s_reason_is_escaped_into_the_bar(self) -> None:
        with self.assertRaises(ExportFailed), self.assertLogs("task_ferry", "ERROR"):
            JobHandler.create_and_start(
                self.user, "example_export", rows=50, seconds=0, fail_at_row=7
            )
        # What a job type may quote from its input: it must not end the attribute.
        ExportJob.objects.update(human_readable_error='Row "7" has <img src=x onerror=alert(1)>')
        self.client.force_login(self.user)
        response = self.client.get("/")
        self.assertContains(
            response,
            'human-readable-error="Row &quot;7&quot; has &lt;img src=x onerror=alert(1)&gt;"',
        )
        self.assertNotContains(response, "<img")

    @override_settings(DEBUG=True)
    def test_demo_user_is_logged_in_automatically(self) -> None:
        response = self.client.get("/")
        self.assertContains(response, "Signed in as <strong>demo</strong>")

    def test_download_is_for_the_owner_of_a_finished_export(self) -> None:
        job = JobHandler.create_and_start(self.user, "example_export", rows=5, seconds=0)
        self.client.force_login(self.user)
        response = self.client.get(f"/exports/{job.pk}/download/")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(len(gzip.decompress(b"".join(response.streaming_content)).splitlines()), 6)
        other = get_user_model().objects.create_user("bob")
        self.client.force_login(other)
        self.assertEqual(self.client.get(f"/exports/{job.pk}/download/").status_code, 404)


class DemoLoginTests(TestCase):
    @override_settings(DEBUG=False)
    def test_refuses_to_run_without_debug(self) -> None:
        with self.assertRaises(MiddlewareNotUsed):
            DemoLoginMiddleware(lambda request: None)


class RunExampleTests(SimpleTestCase):
    def test_only_the_first_ctrl_c_interrupts_it_so_it_still_waits_for_its_worker(self) -> None:
        command = runexample.Command()
        command.interrupted = False
        with self.assertRaises(KeyboardInterrupt):
            command._interrupt(signal.SIGINT, None)
        # A second one, landing before the worker is being stopped, must not end the command.
        command._interrupt(signal.SIGINT, None)
        self.assertTrue(command.interrupted)

    def test_a_taken_port_stops_it_before_the_worker_starts(self) -> None:
        data_dir = tempfile.TemporaryDirectory()
        self.addCleanup(data_dir.cleanup)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            process = subprocess.Popen(
                [sys.executable, str(MANAGE_PY), "runexample", f"127.0.0.1:{port}"],
                env={**os.environ, "EXAMPLE_DATA_DIR": data_dir.name},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                # Its own process group: a worker left behind would still be in it.
                start_new_session=True,
            )
            try:
                stdout, stderr = process.communicate(timeout=60)
                self.assertNotEqual(process.returncode, 0)
                self.assertIn("PORT=9000 make example", stderr)
                self.assertNotIn("db_worker started", stdout)
                with self.assertRaises(ProcessLookupError):
                    os.killpg(process.pid, 0)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def make_job(user: Any, rows: int, fail_at_row: int | None = None) -> ExportJob:
    """A saved export, not started, to run its job type directly."""
    from django.contrib.contenttypes.models import ContentType

    return ExportJob.objects.create(
        user=user,
        type=ExportJobType.type,
        content_type=ContentType.objects.get_for_model(ExportJob),
        rows=rows,
        seconds=0,
        fail_at_row=fail_at_row,
    )


@contextlib.contextmanager
def on_increment(callback: Callable[[Progress], None]) -> Iterator[None]:
    """Call ``callback(node)`` after every ``Progress.increment`` in the block."""
    original = Progress.increment

    def increment(node: Progress, by: float = 1, state: str | None = None) -> None:
        original(node, by, state)
        callback(node)

    Progress.increment = increment  # type: ignore[method-assign]
    try:
        yield
    finally:
        Progress.increment = original  # type: ignore[method-assign]
