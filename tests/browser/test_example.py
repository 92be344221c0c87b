"""The example project in a real browser: its server and db_worker, Debian's Chromium headless.

Needs /usr/bin/chromium (`apt-get install -y chromium`); Playwright never downloads a browser
here. Screenshots go to test-artifacts/browser/.
"""

import gzip
import html
import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest

from tests.ports import free_port

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
MANAGE_PY = REPO / "example" / "manage.py"
ARTIFACTS = REPO / "test-artifacts" / "browser"
BAR = "[role=progressbar]"

pytestmark = [
    pytest.mark.worker,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's Chromium is missing: run `apt-get install -y chromium` "
        "(the browser test uses /usr/bin/chromium and never downloads one).",
    ),
]


def wait_for_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"runexample exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    pytest.fail(f"The example server did not answer {url} in {timeout} s:\n{log.read_text()}")


class ExampleServer:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path, mode: str) -> None:
        self.process = process
        self.url = url
        self.log = log
        self.mode = mode

    def requests_to(self, path: str) -> int:
        """How many requests the server logged for exactly this path."""
        return len(re.findall(rf'"[A-Z]+ {re.escape(path)} HTTP', self.log.read_text()))

    def stop(self, timeout: float = 15) -> int:
        """Stop runexample the way `kill` would; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise

    def group_alive(self) -> bool:
        """True while any process of runexample's process group (its db_worker) runs."""
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


def redis_url() -> str | None:
    """The test Redis, if it answers."""
    import redis

    url = os.environ.get("TASK_FERRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return None
    return url


@pytest.fixture
def example_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExampleServer]:
    """runexample as `make example` runs it ("wsgi": SQLite, file cache, dev server), or
    served by uvicorn with Redis for progress ("asgi"), so bars get a pushed event stream."""
    mode = getattr(request, "param", "wsgi")
    port = free_port()
    log = tmp_path / "runexample.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "REDIS_URL"))}
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        PYTHONPATH=str(REPO),
        EXAMPLE_DATA_DIR=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, str(MANAGE_PY), "runexample", f"127.0.0.1:{port}"]
    key_prefix = f"tf-example-{uuid.uuid4().hex[:8]}"
    if mode == "asgi":
        url = redis_url()
        if url is None:
            pytest.skip("Redis is not reachable on 127.0.0.1:6379")
        env.update(REDIS_URL=url, EXAMPLE_KEY_PREFIX=key_prefix)
        command.append("--asgi")
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group, so nothing it starts can outlive the test.
            start_new_session=True,
        )
    server = ExampleServer(process, f"http://127.0.0.1:{port}/", log, mode)
    try:
        wait_for_http(server.url, process, log, timeout=60)
        yield server
    finally:
        if process.poll() is None:
            server.stop()
        # Shown by pytest only if the test fails: the server's tracebacks behind a 500.
        print(f"--- {log.name} (last 200 lines) ---")
        print("\n".join(log.read_text(errors="replace").splitlines()[-200:]))
        if server.group_alive():
            os.killpg(process.pid, signal.SIGKILL)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"runexample-{mode}.log").write_bytes(log.read_bytes())
        if mode == "asgi":
            import redis

            client = redis.Redis.from_url(env["REDIS_URL"])
            keys = list(client.scan_iter(f"{key_prefix}:*"))
            if keys:
                client.delete(*keys)


@pytest.fixture
def page(example_server: ExampleServer) -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless"]
        )
        context = browser.new_context(viewport={"width": 900, "height": 700}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        try:
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def shot_name(server: ExampleServer, name: str) -> str:
    return name if server.mode == "wsgi" else f"{server.mode}-{name}"


def start_export(page, rows: int, seconds: float):
    previous = page.locator("#job-list > li").count()
    page.fill("input[name=rows]", str(rows))
    page.fill("input[name=seconds]", str(seconds))
    page.click("button[type=submit]")
    playwright_api.expect(page.locator("#job-list > li")).to_have_count(previous + 1)
    return page.locator("#job-list > li").first


def bar_value(job) -> int:
    return int(job.locator(BAR).get_attribute("aria-valuenow"))


def wait_for_bar_between(page, job, low: int, high: int) -> int:
    """Wait until the job's bar shows a value strictly between low and high; return it."""
    job_id = job.get_attribute("data-job-id")
    page.wait_for_function(
        """([id, low, high]) => {
            const bar = document.querySelector(`li[data-job-id="${id}"] [role=progressbar]`);
            const value = Number(bar && bar.getAttribute("aria-valuenow"));
            return value > low && value < high;
        }""",
        arg=[job_id, low, high],
    )
    return bar_value(job)


@pytest.mark.parametrize("example_server", ["wsgi", "asgi"], indirect=True)
def test_start_watch_and_cancel_jobs(example_server: ExampleServer, page) -> None:
    expect = playwright_api.expect
    page.goto(example_server.url)
    expect(page.locator("h1")).to_have_text("Exports")
    expect(page.locator(".who")).to_contain_text("demo")
    screenshot(page, shot_name(example_server, "01-empty.png"))

    job = start_export(page, rows=4000, seconds=4)
    bar = job.locator(BAR)
    expect(bar).to_have_attribute("aria-valuemin", "0")
    expect(bar).to_have_attribute("aria-valuemax", "100")
    # Live progress from the worker: seen strictly between 0 and 100, then at 100.
    moving = wait_for_bar_between(page, job, 0, 100)
    expect(job.locator(".tf-progress__percentage")).not_to_have_text("0%")
    expect(job.locator(".tf-progress__state")).to_have_text("started")
    screenshot(page, shot_name(example_server, "02-running.png"))

    expect(job.locator(".tf-progress__state")).to_have_text("finished", timeout=30_000)
    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(job.locator(".tf-progress__percentage")).to_have_text("100%")
    expect(job.locator(".tf-progress__label")).to_contain_text("Saved 4,000 rows")
    expect(job.locator(".tf-progress__cancel")).to_be_hidden()
    download = job.locator(".job__download")
    expect(download).to_be_visible()
    screenshot(page, shot_name(example_server, "03-finished.png"))
    assert 0 < moving < 100
    if example_server.mode == "asgi":
        # One pushed stream carried the whole job: no reconnection, no poll.
        assert example_server.requests_to("/api/jobs/1/events/") == 1
        assert example_server.requests_to("/api/jobs/1/") == 0
    else:
        # The development server cannot push, so the page polls.
        assert example_server.requests_to("/api/jobs/1/events/") == 0
        assert example_server.requests_to("/api/jobs/1/") >= 2

    response = page.request.get(urljoin(example_server.url, download.get_attribute("href")))
    assert response.status == 200
    lines = gzip.decompress(response.body()).decode().splitlines()
    assert lines[0] == "id,date,region,product,quantity,amount"
    assert len(lines) == 4001

    job = start_export(page, rows=5000, seconds=60)
    wait_for_bar_between(page, job, 0, 100)
    expect(job.locator(".tf-progress__state")).to_have_text("started")
    job.get_by_role("button", name="Cancel").click()
    expect(job.locator(".tf-progress__state")).to_have_text("cancelled", timeout=15_000)
    stopped_at = bar_value(job)
    assert 0 < stopped_at < 100
    expect(job.locator(".tf-progress__cancel")).to_be_hidden()
    expect(job.locator(".job__download")).to_be_hidden()
    screenshot(page, shot_name(example_server, "04-cancelled.png"))

    # The server-rendered list agrees after a reload, and ended jobs need no requests.
    page.reload()
    states = page.locator("#job-list .tf-progress__state")
    expect(states).to_have_text(["cancelled", "finished"])
    screenshot(page, shot_name(example_server, "05-reloaded.png"))
    assert page.errors == []

    # runexample stops its db_worker when it is stopped.
    assert example_server.stop() == 0
    deadline = time.monotonic() + 10
    while example_server.group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not example_server.group_alive(), example_server.log.read_text()


def test_a_failed_export_shows_why_and_leaves_no_file(
    example_server: ExampleServer, page, tmp_path: Path
) -> None:
    expect = playwright_api.expect
    page.goto(example_server.url)
    page.fill("input[name=fail_at_row]", "3000")
    job = start_export(page, rows=4000, seconds=2)
    expect(job.locator(".tf-progress__state")).to_have_text("failed", timeout=30_000)
    reason = "The export stopped at row 3,000, as you asked."
    expect(job.locator(".tf-progress__error")).to_have_text(reason)
    expect(job.locator(".job__download")).to_be_hidden()
    screenshot(page, shot_name(example_server, "06-failed.png"))
    # on_error removed the rows written before the failure.
    assert list((tmp_path / "export-files").iterdir()) == []

    # The page renders the reason into the bar's human-readable-error attribute.
    page.reload()
    job = page.locator("#job-list > li").first
    expect(job.locator(".tf-progress__state")).to_have_text("failed")
    expect(job.locator(".tf-progress__error")).to_have_text(reason)
    assert page.errors == []


# What a job's owner may have typed into a value the error quotes; shown as text, never run.
HTML_ERROR = '<img src=x onerror="window.pwned = true"> is not a valid row.'


def test_a_server_rendered_failed_bar_shows_its_error_as_text(
    example_server: ExampleServer, page
) -> None:
    """A page that renders a failed job gives the bar its human_readable_error; the bar makes
    no request for an ended job, so it said only "The job failed."."""
    expect = playwright_api.expect
    rendered = "".join(
        f'<task-ferry-progress job-id="{job_id}" state="failed" percentage="40"'
        f' progress-state="Writing CSV"{attributes}></task-ferry-progress>'
        for job_id, attributes in [
            (9001, ' human-readable-error="The export stopped at row 7, as you asked."'),
            # As Django's template autoescaping writes it into the attribute.
            (9002, f' human-readable-error="{html.escape(HTML_ERROR)}"'),
            (9003, ""),
        ]
    )
    body = (
        '<!doctype html><html lang="en"><title>Jobs</title>'
        '<script src="/static/task_ferry/ferry.js" defer></script>'
        f"<body>{rendered}</body></html>"
    )
    page.route(
        re.compile(r"/rendered-jobs/$"),
        lambda route: route.fulfill(status=200, content_type="text/html", body=body),
    )
    page.goto(urljoin(example_server.url, "/rendered-jobs/"))
    bars = page.locator("task-ferry-progress")
    expect(bars.locator(".tf-progress__error")).to_have_text(
        ["The export stopped at row 7, as you asked.", HTML_ERROR, "The job failed."]
    )
    expect(bars.first.locator(".tf-progress__label")).to_have_text("Writing CSV")

    # startJob's answer for a job that failed as it was created (an unreachable queue).
    page.evaluate(
        """(error) => TaskFerry.mountProgress(document.body, 9004, {
            sse: false,
            job: {id: 9004, state: "failed", progress_percentage: 0, progress_state: "",
                  human_readable_error: error},
        })""",
        HTML_ERROR,
    )
    expect(bars.nth(3).locator(".tf-progress__error")).to_have_text(HTML_ERROR)
    expect(bars.nth(3)).to_have_attribute("human-readable-error", HTML_ERROR)

    page.wait_for_timeout(500)
    assert page.locator("task-ferry-progress img").count() == 0
    assert page.evaluate("() => window.pwned") is None
    # Ended jobs: no request (these ids do not even exist).
    for job_id in (9001, 9002, 9003, 9004):
        assert example_server.requests_to(f"/api/jobs/{job_id}/") == 0
        assert example_server.requests_to(f"/api/jobs/{job_id}/events/") == 0
    screenshot(page, "07-rendered-failed.png")
    assert page.errors == []


@pytest.mark.parametrize("following", ["stream", "polling"])
def test_a_bar_shows_the_error_of_a_failed_job_it_loads(
    example_server: ExampleServer, page, following: str
) -> None:
    """A bar given no starting state learns from the API that its job failed, and why."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    job_id = page.evaluate(
        """async () => {
            const values = {rows: 500, seconds: 0, fail_at_row: 7};
            const job = await TaskFerry.startJob("example_export", values);
            await TaskFerry.followJob(job.id, {sse: false, pollInterval: 200}).done;
            return String(job.id);
        }"""
    )
    no_sse = " no-sse" if following == "polling" else ""
    page.evaluate(
        """([id, noSse]) => document.body.insertAdjacentHTML("beforeend",
            `<task-ferry-progress job-id="${id}"${noSse}></task-ferry-progress>`)""",
        [job_id, no_sse],
    )
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar).to_have_attribute("state", "failed")
    expect(bar.locator(".tf-progress__error")).to_have_text(
        "The export stopped at row 7, as you asked."
    )
    assert page.errors == []


def test_bar_backs_off_while_the_network_is_down(example_server: ExampleServer, page) -> None:
    expect = playwright_api.expect
    page.goto(example_server.url)
    job = start_export(page, rows=2000, seconds=5)
    wait_for_bar_between(page, job, 0, 100)

    attempts: list[float] = []

    def refuse(route) -> None:
        attempts.append(time.monotonic())
        route.abort("connectionrefused")

    # The job's own endpoints (detail and events) become unreachable for 8 s.
    job_endpoints = re.compile(r"/api/jobs/\d+/")
    page.route(job_endpoints, refuse)
    expect(job.locator(".tf-progress__error")).to_contain_text("Connection lost", timeout=10_000)
    page.wait_for_timeout(4_000)
    screenshot(page, "06-retrying.png")
    page.wait_for_timeout(4_000)
    page.unroute(job_endpoints)

    expect(job.locator(".tf-progress__state")).to_have_text("finished", timeout=40_000)
    expect(job.locator(".tf-progress__error")).to_be_hidden()
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # Polling every second would have made 8 attempts; backoff makes at most 6, and waits
    # at least 2 s (the third retry's shortest delay) before giving up on a quiet network.
    assert 3 <= len(attempts) <= 6, gaps
    assert max(gaps) >= 1.9, gaps
    assert page.errors == []


def mount_bar(page, seconds: float) -> str:
    """Start an export from page JavaScript and mount a bar with default options (SSE on)."""
    job_id = page.evaluate(
        """async (seconds) => {
            const job = await TaskFerry.startJob("example_export", {rows: 500, seconds});
            TaskFerry.mountProgress(document.body, job.id, {job});
            return String(job.id);
        }""",
        seconds,
    )
    return job_id


def open_example_page(page, example_server: ExampleServer) -> None:
    """The example's page, once ferry.js has loaded."""
    page.goto(example_server.url)
    page.wait_for_function("() => window.TaskFerry !== undefined")


def test_bar_uses_the_stream_fallbacks(example_server: ExampleServer, page) -> None:
    expect = playwright_api.expect
    open_example_page(page, example_server)

    # Under WSGI the events endpoint answers one event per request, and the browser
    # reconnects: the bar follows the job through the stream alone.
    job_id = mount_bar(page, seconds=2)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar).to_have_attribute("state", "finished", timeout=30_000)
    expect(bar.locator(BAR)).to_have_attribute("aria-valuenow", "100")
    assert example_server.requests_to(f"/api/jobs/{job_id}/events/") >= 2
    assert example_server.requests_to(f"/api/jobs/{job_id}/") == 0

    # A proxy that refuses event streams: the bar polls instead.
    page.route(
        re.compile(r"/api/jobs/\d+/events/"),
        lambda route: route.fulfill(status=404, json={"detail": "Not found."}),
    )
    job_id = mount_bar(page, seconds=2)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar).to_have_attribute("state", "finished", timeout=30_000)
    assert example_server.requests_to(f"/api/jobs/{job_id}/") >= 2
    assert page.errors == []


def test_bar_polls_and_reopens_its_stream_when_told_to_reconnect(
    example_server: ExampleServer, page
) -> None:
    """A stream that ends with ``reconnect`` (its server lost Redis for longer than it waits):
    the bar polls the job at once, then opens a new stream."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    told: list[str] = []

    def lost_redis(route) -> None:
        if told:
            route.continue_()
            return
        response = route.fetch()
        told.append(response.text())
        ending = 'event: reconnect\ndata: {"reason":"redis-unavailable"}\n\n'
        route.fulfill(response=response, body=response.text() + ending)

    page.route(re.compile(r"/api/jobs/\d+/events/"), lost_redis)
    job_id = mount_bar(page, seconds=3)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar).to_have_attribute("state", "finished", timeout=30_000)
    assert len(told) == 1 and "event: job" in told[0]
    # Without it, the browser reconnected after the stream's retry delay, with no poll.
    assert example_server.requests_to(f"/api/jobs/{job_id}/") >= 1
    assert example_server.requests_to(f"/api/jobs/{job_id}/events/") >= 2
    assert page.errors == []


def test_a_second_interrupt_during_shutdown_still_stops_the_worker(
    example_server: ExampleServer,
) -> None:
    # `kill -INT <pid>` twice: only runexample gets them, so it must still stop its worker.
    example_server.process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    example_server.process.send_signal(signal.SIGINT)
    example_server.process.wait(30)
    deadline = time.monotonic() + 10
    while example_server.group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not example_server.group_alive(), example_server.log.read_text()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["kill", "kill-INT"])
def test_stopping_runexample_alone_fails_a_running_export_as_interrupted(
    example_server: ExampleServer, page, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """`kill <pid>` (or `kill -INT <pid>`) reaches runexample, not its worker: the worker must
    still stop the running export so that the page shows it failed ("interrupted"), not leave
    it started for the stale-job sweep (it was sent SIGKILL after the first grace period)."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    job_id = mount_bar(page, seconds=120)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar).to_have_attribute("state", "started", timeout=30_000)

    example_server.process.send_signal(stop_signal)
    example_server.process.wait(40)

    log = example_server.log.read_text()
    assert "db_worker stopped" in log, log
    with sqlite3.connect(tmp_path / "db.sqlite3") as database:
        state, error, human_readable_error = database.execute(
            "SELECT state, error, human_readable_error FROM task_ferry_job WHERE id = ?",
            (int(job_id),),
        ).fetchone()
    assert state == "failed", (state, error, log)
    assert (
        human_readable_error == "This job was interrupted before it could finish. Start it again."
    )
    assert "SystemExit" in error


def mount_polling_bar(page, seconds: float, poll_interval: int = 300) -> str:
    """Start an export from page JavaScript and mount a bar that polls (no event stream)."""
    return page.evaluate(
        """async ([seconds, pollInterval]) => {
            const job = await TaskFerry.startJob("example_export", {rows: 500, seconds});
            TaskFerry.mountProgress(document.body, job.id, {job, sse: false, pollInterval});
            return String(job.id);
        }""",
        [seconds, poll_interval],
    )


def test_bar_keeps_a_failed_cancel_in_view(example_server: ExampleServer, page) -> None:
    """The next progress update does not wipe "Could not cancel" before anyone can read it."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    page.route(
        re.compile(r"/api/jobs/\d+/cancel/"),
        lambda route: route.fulfill(
            status=403, json={"detail": "CSRF Failed: CSRF token missing."}
        ),
    )
    job_id = mount_polling_bar(page, seconds=30)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    bar.get_by_role("button", name=f"Cancel Job {job_id}").click()
    error = bar.locator(".tf-progress__error")
    expect(error).to_have_text("Could not cancel: CSRF Failed: CSRF token missing.")
    polls = example_server.requests_to(f"/api/jobs/{job_id}/")
    page.wait_for_timeout(1_500)
    assert example_server.requests_to(f"/api/jobs/{job_id}/") > polls
    expect(error).to_have_text("Could not cancel: CSRF Failed: CSRF token missing.")
    expect(bar.get_by_role("button", name=f"Cancel Job {job_id}")).to_be_enabled()
    assert page.errors == []


@pytest.mark.parametrize("mounted_by", ["mountProgress", "attributes"])
def test_bar_cancels_with_the_csrf_cookie_and_header_a_project_renamed(
    example_server: ExampleServer, page, mounted_by: str
) -> None:
    """A project with its own CSRF_COOKIE_NAME and CSRF_HEADER_NAME names them to the bar. Its
    Cancel sent the default cookie's token in X-CSRFToken, which that project refuses."""
    open_example_page(page, example_server)
    page.context.add_cookies(
        [{"name": "shop_csrftoken", "value": "shop-token", "url": example_server.url}]
    )
    sent: list[dict[str, str]] = []

    def refuse(route) -> None:
        sent.append(route.request.headers)
        route.fulfill(status=403, json={"detail": "CSRF Failed: CSRF token missing."})

    cancels = re.compile(r"/api/jobs/\d+/cancel/")
    page.route(cancels, refuse)
    job_id = page.evaluate(
        """async (mountedBy) => {
            const job = await TaskFerry.startJob("example_export", {rows: 500, seconds: 30});
            const names = {csrfCookieName: "shop_csrftoken", csrfHeaderName: "X-Shop-CSRF"};
            if (mountedBy === "mountProgress") {
                TaskFerry.mountProgress(document.body, job.id, {job, sse: false, ...names});
            } else {
                document.body.insertAdjacentHTML("beforeend", `<task-ferry-progress
                    job-id="${job.id}" no-sse csrf-cookie-name="shop_csrftoken"
                    csrf-header-name="X-Shop-CSRF"></task-ferry-progress>`);
            }
            return String(job.id);
        }""",
        mounted_by,
    )
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    bar.get_by_role("button", name=f"Cancel Job {job_id}").click()
    playwright_api.expect(bar.locator(".tf-progress__error")).to_contain_text("Could not cancel")
    assert [headers.get("x-shop-csrf") for headers in sent] == ["shop-token"]
    assert "x-csrftoken" not in sent[0]
    page.unroute(cancels)
    page.evaluate("(id) => TaskFerry.cancelJob(id)", job_id)
    assert page.errors == []


def test_bar_stops_on_a_page_that_is_not_json(example_server: ExampleServer, page) -> None:
    """A 200 HTML page (a login page after a redirect, a wrong `api`) is an error, not silence."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    page.route(
        re.compile(r"/api/jobs/\d+/$"),
        lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>Log in</title>"
        ),
    )
    page.evaluate(
        """() => document.addEventListener("task-ferry:error", (event) => {
            window.ferryErrors = (window.ferryErrors || []).concat([event.detail.message]);
        })"""
    )
    job_id = mount_polling_bar(page, seconds=5)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar.locator(".tf-progress__error")).to_have_text(
        "The server did not answer with JSON (HTTP 200)."
    )
    assert page.evaluate("() => window.ferryErrors") == [
        "The server did not answer with JSON (HTTP 200)."
    ]
    requests = example_server.requests_to(f"/api/jobs/{job_id}/")
    page.wait_for_timeout(1_000)
    # Routed requests never reach the server; the bar made no more of them either.
    assert example_server.requests_to(f"/api/jobs/{job_id}/") == requests == 0
    assert page.errors == []


def test_bar_removed_while_cancelling_stops_following(example_server: ExampleServer, page) -> None:
    """A cancel answer that arrives after the bar left the page starts no polling."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    held: list[object] = []
    page.route(re.compile(r"/api/jobs/\d+/cancel/"), lambda route: held.append(route))
    job_id = mount_polling_bar(page, seconds=30)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar).to_have_attribute("state", "started", timeout=15_000)
    bar.get_by_role("button", name=f"Cancel Job {job_id}").click()
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, "the cancel request never left the page"
    page.evaluate(
        "(id) => document.querySelector(`task-ferry-progress[job-id='${id}']`).remove()", job_id
    )
    # The server's answer for a running job (which then keeps running: it never got the request).
    running = page.request.get(urljoin(example_server.url, f"/api/jobs/{job_id}/")).json()
    assert running["state"] == "started"
    polls = example_server.requests_to(f"/api/jobs/{job_id}/")
    held[0].fulfill(json=running)
    page.wait_for_timeout(2_000)
    assert example_server.requests_to(f"/api/jobs/{job_id}/") == polls
    assert page.errors == []


def test_bar_follows_the_job_it_is_given_next(example_server: ExampleServer, page) -> None:
    """Setting another `job-id` on a bar whose job ended follows the new job, named after it."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    first = mount_polling_bar(page, seconds=1)
    bar = page.locator(f'task-ferry-progress[job-id="{first}"]')
    expect(bar).to_have_attribute("state", "finished", timeout=30_000)
    second = page.evaluate(
        """async (first) => {
            const job = await TaskFerry.startJob("example_export", {rows: 500, seconds: 3});
            const bar = document.querySelector(`task-ferry-progress[job-id="${first}"]`);
            bar.setAttribute("job-id", String(job.id));
            return String(job.id);
        }""",
        first,
    )
    bar = page.locator(f'task-ferry-progress[job-id="{second}"]')
    expect(bar).not_to_have_attribute("state", "finished")
    expect(bar.get_by_role("progressbar", name=f"Job {second}")).to_be_visible()
    expect(bar.get_by_role("button", name=f"Cancel Job {second}")).to_be_visible()
    expect(bar).to_have_attribute("state", "finished", timeout=30_000)
    assert example_server.requests_to(f"/api/jobs/{second}/") >= 2
    assert page.errors == []


@pytest.mark.parametrize("example_server", ["asgi"], indirect=True)
def test_bars_leave_connections_for_other_requests(example_server: ExampleServer, page) -> None:
    """Seven bars of live jobs on HTTP/1.1 (six connections per host) keep the page usable:
    only four hold an event stream, the others poll, and cancelling one goes through. (Five
    jobs, the example's limit per user; two of them have a second bar.)"""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    job_ids = page.evaluate(
        """async () => {
            const jobs = [];
            for (let i = 0; i < 5; i++) {
                jobs.push(await TaskFerry.startJob("example_export", {rows: 500, seconds: 60}));
            }
            jobs.push(jobs[0], jobs[1]);
            for (const job of jobs) TaskFerry.mountProgress(document.body, job.id, {job});
            return jobs.map((job) => String(job.id));
        }"""
    )
    bars = page.locator("task-ferry-progress")
    expect(bars).to_have_count(7)
    page.wait_for_timeout(2_000)
    distinct = sorted(set(job_ids), key=int)

    def streams() -> int:
        return sum(example_server.requests_to(f"/api/jobs/{i}/events/") for i in distinct)

    assert streams() == 4
    assert example_server.requests_to(f"/api/jobs/{distinct[4]}/") >= 1
    last = bars.nth(6)
    last.get_by_role("button", name=f"Cancel Job {job_ids[6]}").click()
    expect(last).to_have_attribute("state", "cancelled", timeout=15_000)
    expect(bars.nth(1)).to_have_attribute("state", "cancelled", timeout=15_000)
    # The cancelled job's stream closed; one of the polling bars may have taken its place.
    page.wait_for_timeout(2_000)
    assert streams() <= 5
    page.evaluate(
        "() => document.querySelectorAll('task-ferry-progress').forEach((e) => e.remove())"
    )
    assert page.errors == []


def test_a_page_sets_how_many_streams_its_bars_open(example_server: ExampleServer, page) -> None:
    """``max-streams`` on the element (``maxStreams`` of mountProgress): a page behind HTTP/2,
    or one that wants its connections for itself, chooses the budget its bars share."""
    open_example_page(page, example_server)
    job_ids = page.evaluate(
        """async () => {
            const jobs = [];
            for (let i = 0; i < 3; i++) {
                jobs.push(await TaskFerry.startJob("example_export", {rows: 500, seconds: 60}));
            }
            for (const job of jobs) {
                TaskFerry.mountProgress(document.body, job.id, {job, maxStreams: 1});
            }
            return jobs.map((job) => String(job.id));
        }"""
    )
    bars = page.locator("task-ferry-progress")
    playwright_api.expect(bars.first).to_have_attribute("max-streams", "1")
    page.wait_for_timeout(2_000)
    streamed = [i for i in job_ids if example_server.requests_to(f"/api/jobs/{i}/events/")]
    polled = [i for i in job_ids if example_server.requests_to(f"/api/jobs/{i}/")]
    assert len(streamed) == 1
    assert sorted(polled) == sorted(set(job_ids) - set(streamed))
    page.evaluate(
        "() => document.querySelectorAll('task-ferry-progress').forEach((e) => e.remove())"
    )
    assert page.errors == []


def test_bar_rewrites_its_live_regions_only_when_they_change(
    example_server: ExampleServer, page
) -> None:
    """The state badge (aria-live) and the alert are written when their text changes, not at
    every progress update, so a screen reader has nothing to announce again."""
    expect = playwright_api.expect
    open_example_page(page, example_server)
    page.route(
        re.compile(r"/api/jobs/\d+/cancel/"),
        lambda route: route.fulfill(status=403, json={"detail": "CSRF Failed."}),
    )
    job_id = mount_polling_bar(page, seconds=3, poll_interval=200)
    bar = page.locator(f'task-ferry-progress[job-id="{job_id}"]')
    expect(bar).to_have_attribute("state", "started", timeout=15_000)
    bar.get_by_role("button", name=f"Cancel Job {job_id}").click()
    expect(bar.locator(".tf-progress__error")).to_have_text("Could not cancel: CSRF Failed.")
    page.evaluate(
        """(id) => {
            const bar = document.querySelector(`task-ferry-progress[job-id="${id}"]`);
            window.writes = {state: 0, alert: 0, updates: 0};
            const count = (name) => new MutationObserver((records) => {
                window.writes[name] += records.length;
            });
            count("state").observe(bar.querySelector(".tf-progress__state"), {childList: true});
            count("alert").observe(bar.querySelector("[role=alert]"), {childList: true});
            bar.addEventListener("task-ferry:update", () => { window.writes.updates += 1; });
        }""",
        job_id,
    )
    expect(bar).to_have_attribute("state", "finished", timeout=30_000)
    writes = page.evaluate("() => window.writes")
    assert writes["updates"] >= 5, writes
    # "started" becomes "finished": one write. The alert is cleared once, at the job's end.
    assert writes["state"] == 1, writes
    assert writes["alert"] == 1, writes
    expect(bar.locator(".tf-progress__error")).to_be_hidden()
    assert page.errors == []


def follow_polling_with_retries(page, *, backoff_base: int, record: str) -> None:
    """Start a one-second export and follow it by polling alone (``window.followed``), each
    retry's ``record`` (a JavaScript expression of ``retry``) pushed to ``window.retries``."""
    page.evaluate(
        f"""async () => {{
            const job = await TaskFerry.startJob("example_export", {{rows: 500, seconds: 1}});
            window.retries = [];
            window.followed = TaskFerry.followJob(job.id, {{
                sse: false,
                backoffBase: {backoff_base},
                onRetry: (retry) => window.retries.push({record}),
            }});
        }}"""
    )


def test_following_retries_any_server_error(example_server: ExampleServer, page) -> None:
    """docs/javascript.md: a poll answered with a 5xx is retried with backoff. A CDN's own
    (Cloudflare's 524, a timeout) stopped the follower for good."""
    open_example_page(page, example_server)
    answers: list[int] = []

    def cdn(route) -> None:
        if len(answers) < 2:
            answers.append(524)
            route.fulfill(status=524, content_type="text/html", body="<p>A timeout occurred</p>")
        else:
            route.continue_()

    page.route(re.compile(r"/api/jobs/\d+/$"), cdn)
    follow_polling_with_retries(page, backoff_base=200, record="retry.error.status")
    assert page.evaluate("async () => (await window.followed.done).state") == "finished"
    assert page.evaluate("() => window.retries") == [524, 524]
    assert page.errors == []


# How a test route answers a request to /answer/<name>/...; "refused" breaks the connection.
FAILED_ANSWERS = {
    "500": {"status": 500, "content_type": "text/html", "body": "<h1>Server Error (500)</h1>"},
    "502": {"status": 502, "content_type": "text/html", "body": "<h1>502 Bad Gateway</h1>"},
    "503": {"status": 503, "content_type": "text/html", "body": "<p>Request timeout</p>"},
    "503-retry-after": {"status": 503, "headers": {"Retry-After": "30"}, "json": {}},
    "504": {"status": 504, "content_type": "text/html", "body": "<h1>504 Gateway Time-out</h1>"},
    "524": {"status": 524, "content_type": "text/html", "body": "<p>A timeout occurred</p>"},
    "408": {"status": 408, "json": {"detail": "Request timeout."}},
    "429": {"status": 429, "json": {"detail": "Too many.", "code": "max_job_count_exceeded"}},
    "404": {"status": 404, "json": {"detail": "Not found."}},
}


@pytest.mark.parametrize("entry_point", ["ferry.js", "ferry.mjs"])
def test_an_error_is_retryable_only_when_sending_the_request_again_is_safe(
    example_server: ExampleServer, page, entry_point: str
) -> None:
    """docs/javascript.md: a 500 on startJob may come after the job was created, and sending
    it again could start a second job; it said retryable, as on a poll. fetchJob and cancelJob
    may be sent again after any 5xx, and startJob after a refusal (429, 503 with Retry-After)."""
    open_example_page(page, example_server)
    answers = [*FAILED_ANSWERS, "refused"]

    def answer(route) -> None:
        name = re.search(r"/answer/([^/]+)/", route.request.url).group(1)
        if name == "refused":
            route.abort("connectionrefused")
        else:
            route.fulfill(**FAILED_ANSWERS[name])

    page.route(re.compile(r"/answer/"), answer)
    retryable = page.evaluate(
        """async ([entryPoint, answers]) => {
            const ferry = entryPoint === "ferry.mjs"
                ? await import("/static/task_ferry/ferry.mjs")
                : window.TaskFerry;
            const calls = {
                fetchJob: (base) => ferry.fetchJob(17, {base}),
                cancelJob: (base) => ferry.cancelJob(17, {base}),
                startJob: (base) => ferry.startJob("example_export", {rows: 5}, {base}),
            };
            const retryable = {};
            for (const [name, call] of Object.entries(calls)) {
                retryable[name] = {};
                for (const answer of answers) {
                    const error = await call(`/answer/${answer}/`).then(() => null, (e) => e);
                    if (!(error instanceof ferry.TaskFerryError)) throw error;
                    retryable[name][answer] = [error.status, error.retryable];
                }
            }
            return retryable;
        }""",
        [entry_point, answers],
    )
    for safe_to_repeat in ("fetchJob", "cancelJob"):
        assert retryable[safe_to_repeat] == {
            **{name: [int(name[:3]), True] for name in FAILED_ANSWERS},
            "404": [404, False],
            "refused": [0, True],
        }
    assert retryable["startJob"] == {
        "500": [500, False],
        "502": [502, False],
        "503": [503, False],
        "503-retry-after": [503, True],
        "504": [504, False],
        "524": [524, False],
        "408": [408, True],
        "429": [429, True],
        "404": [404, False],
        "refused": [0, False],
    }
    assert page.errors == []


def test_following_catches_up_when_the_browser_is_back_online(
    example_server: ExampleServer, page
) -> None:
    """A follower waiting out its backoff after a network error polls as soon as the browser
    is back online, not at the end of the wait."""
    open_example_page(page, example_server)
    offline = {"on": True}
    attempts: list[float] = []

    def network(route) -> None:
        attempts.append(time.monotonic())
        if offline["on"]:
            route.abort("internetdisconnected")
        else:
            route.continue_()

    page.route(re.compile(r"/api/jobs/\d+/$"), network)
    follow_polling_with_retries(page, backoff_base=16000, record="retry.delay")
    page.wait_for_function("() => window.retries.length === 1")
    page.context.set_offline(True)
    offline["on"] = False
    back = time.monotonic()
    page.context.set_offline(False)

    assert page.evaluate("async () => (await window.followed.done).state") == "finished"
    waited = page.evaluate("() => window.retries[0]")
    # The wait was 8 to 16 s; the next attempt came with the network (on a busy machine a
    # browser takes its time, but not the rest of the wait).
    assert waited >= 8000
    assert attempts[1] - back < 4, attempts
    assert page.errors == []


def test_following_catches_up_when_the_page_is_shown_again(
    example_server: ExampleServer, page
) -> None:
    """Browsers run a hidden tab's timers about once a minute: a follower whose next poll is
    due later polls as soon as the page is shown, and not while it is hidden."""
    open_example_page(page, example_server)
    page.evaluate(
        """async () => {
            const job = await TaskFerry.startJob("example_export", {rows: 500, seconds: 1});
            window.jobId = job.id;
            window.updates = [];
            window.followed = TaskFerry.followJob(job.id, {
                sse: false,
                pollInterval: 120000,
                onUpdate: (job) => window.updates.push(job.state),
            });
            window.show = (state) => {
                Object.defineProperty(document, "visibilityState", {
                    value: state, configurable: true,
                });
                document.dispatchEvent(new Event("visibilitychange"));
            };
        }"""
    )
    page.wait_for_function("() => window.updates.length === 1")
    # The one-second job finishes (asked here, not by the follower): its next poll, due in two
    # minutes, would show it finished. A fixed wait was too short on a loaded machine, where
    # db_worker takes the job late: the poll on showing the page then saw it started, and the
    # follower waited out its two minutes.
    job_url = urljoin(example_server.url, f"/api/jobs/{page.evaluate('() => window.jobId')}/")
    deadline = time.monotonic() + 30
    while page.request.get(job_url).json()["state"] != "finished":
        assert time.monotonic() < deadline, "the export did not finish in 30 s"
        time.sleep(0.1)
    # Hidden, the page does not ask.
    page.evaluate("() => window.show('hidden')")
    page.wait_for_timeout(500)
    assert page.evaluate("() => window.updates.length") == 1

    page.evaluate("() => window.show('visible')")
    page.wait_for_function("() => window.updates.length === 2", timeout=15_000)
    assert page.evaluate("async () => (await window.followed.done).state") == "finished"
    assert page.errors == []
