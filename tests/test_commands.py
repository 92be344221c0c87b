"""The management commands: task_ferry_cleanup and task_ferry_jobs."""

import datetime
import io
import re

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from task_ferry.handler import JobHandler, transition
from task_ferry.management.commands import task_ferry_jobs
from task_ferry.management.commands.task_ferry_cleanup import parse_age
from task_ferry.models import Heartbeat, Job, JobState, jobs_database
from task_ferry.snapshot import job_snapshot
from task_ferry.stores.base import get_store
from tests.jobs import make_job, started_job, sweep_messages
from tests.terminal import TerminalOutput
from tests.testapp.models import HookCall


@pytest.fixture(autouse=True)
def terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")


def run(*args, stdout=None):
    out = stdout or io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def ended_job(user, state, days_ago, type_name="scripted"):
    job = (
        make_job(user) if type_name == "scripted" else JobHandler.create_and_start(user, type_name)
    )
    finished = timezone.now() - datetime.timedelta(days=days_ago)
    Job.objects.filter(pk=job.pk).update(state=state, finished_at=finished)
    return job


@pytest.fixture
def aged_jobs(user):
    return {
        "old_finished": ended_job(user, JobState.FINISHED, 10),
        "old_failed": ended_job(user, JobState.FAILED, 5),
        "old_limited": ended_job(user, JobState.CANCELLED, 8, "limited"),
        "recent": ended_job(user, JobState.FINISHED, 1),
        "half_day": ended_job(user, JobState.FINISHED, 0.4),
        "live": make_job(user),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3d", datetime.timedelta(days=3)),
        ("12h", datetime.timedelta(hours=12)),
        ("90m", datetime.timedelta(minutes=90)),
        ("45s", datetime.timedelta(seconds=45)),
        ("2w", datetime.timedelta(weeks=2)),
        ("7", datetime.timedelta(days=7)),
        ("1.5d", datetime.timedelta(hours=36)),
    ],
)
def test_parse_age(text, expected):
    assert parse_age(text) == expected


@pytest.mark.parametrize("text", ["", "3 days", "-1d", "d", "3y"])
def test_bad_age_says_what_to_write(db, text):
    with pytest.raises(CommandError, match="30s, 90m, 12h, 3d or 2w"):
        call_command("task_ferry_cleanup", older_than=text)


@pytest.mark.parametrize("text", ["36501d", "3000000d", "99999999999d"])
def test_an_age_too_far_back_is_refused(db, text):
    with pytest.raises(CommandError, match="too far back"):
        call_command("task_ferry_cleanup", older_than=text)


def test_cleanup_dry_run_deletes_nothing(aged_jobs):
    out = run("task_ferry_cleanup", "--dry-run", "--older-than", "3d")
    assert "Would delete 3 ended job(s)" in out
    assert "older than 3 days" in out
    assert "  scripted: 2 (failed 1, finished 1)" in out
    assert "  limited: 1 (cancelled 1)" in out
    assert Job.objects.count() == 6
    assert not HookCall.objects.exists()


def test_cleanup_dry_run_lists_jobs_with_verbosity_2(aged_jobs):
    out = run("task_ferry_cleanup", "--dry-run", "--older-than", "3d", "-v", "2")
    for name in ("old_finished", "old_failed", "old_limited"):
        job = Job.objects.get(pk=aged_jobs[name].pk)
        ended = job.finished_at.astimezone(datetime.UTC)
        assert f"#{job.pk} {job.type} {job.state} at {ended:%Y-%m-%d %H:%M:%S} UTC\n" in out
    assert f"#{aged_jobs['recent'].pk} " not in out


def test_cleanup_deletes_through_the_handler(aged_jobs):
    out = run("task_ferry_cleanup", "--older-than", "12h")
    assert "Deleted 4 ended job(s)" in out
    left = set(Job.objects.values_list("pk", flat=True))
    assert left == {aged_jobs["half_day"].pk, aged_jobs["live"].pk}
    # before_delete ran once per deleted job: the handler's path.
    deleted = {aged_jobs[n].pk for n in ("old_finished", "old_failed", "old_limited", "recent")}
    assert sorted(
        HookCall.objects.filter(hook="before_delete").values_list("job_id", flat=True)
    ) == sorted(deleted)


def test_cleanup_defaults_to_job_expiry_days(aged_jobs, settings):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "JOB_EXPIRY_DAYS": 6}
    out = run("task_ferry_cleanup")
    assert "Deleted 2 ended job(s)" in out
    assert "older than 6 days" in out
    assert Job.objects.filter(pk=aged_jobs["old_failed"].pk).exists()


@pytest.fixture
def live_jobs(user):
    pending = make_job(user, progress_state="")
    running = make_job(None)
    transition(running, JobState.STARTED, from_states=[JobState.PENDING])
    get_store().delete([pending.pk, running.pk])
    return pending, running


def publish_progress(job, percentage, label):
    get_store().write(
        job.pk,
        {
            **job_snapshot(job),
            "state": "started",
            "progress_percentage": percentage,
            "progress_state": label,
        },
    )


def test_jobs_plain_lines_from_store_and_database(live_jobs):
    pending, running = live_jobs
    Job.objects.filter(pk=pending.pk).update(progress_percentage=5, progress_state="queued")
    publish_progress(running, 42, "copying rows")
    finished = make_job(None, state=JobState.FINISHED)

    out = run("task_ferry_jobs")
    lines = out.splitlines()
    assert lines[0] == f"#{pending.pk} scripted alice pending 5% queued"
    assert lines[1].startswith(f"#{running.pk} scripted (system) started 42% copying rows (")
    assert f"#{finished.pk}" not in out
    assert "\x1b[" not in out


def test_jobs_flags_a_started_job_whose_worker_stopped_beating(live_jobs, settings):
    """After a deploy or an OOM kill, the job a dead worker ran still shows as started until
    the sweep fails it: the listing says which ones have gone quiet."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_INTERVAL": 10}
    _, quiet = live_jobs
    beating = make_job(None)
    transition(beating, JobState.STARTED, from_states=[JobState.PENDING])
    just_started = make_job(None)
    transition(just_started, JobState.STARTED, from_states=[JobState.PENDING])
    now = timezone.now()
    Heartbeat.objects.create(job=quiet, worker="w1", beat_at=now - datetime.timedelta(seconds=75))
    Heartbeat.objects.create(job=beating, worker="w2", beat_at=now - datetime.timedelta(seconds=5))

    lines = {int(line.split()[0][1:]): line for line in run("task_ferry_jobs").splitlines()}
    assert re.search(r"\[no heartbeat for 1:1[5-9]\]$", lines[quiet.pk]), lines[quiet.pk]
    assert "heartbeat" not in lines[beating.pk]
    assert "heartbeat" not in lines[just_started.pk]  # no beat yet, started a moment ago


def test_jobs_filters_by_type(live_jobs, user):
    limited = JobHandler.create_and_start(user, "limited")
    Job.objects.filter(pk=limited.pk).update(state=JobState.PENDING, progress_percentage=0)
    get_store().delete([limited.pk])
    out = run("task_ferry_jobs", "--type", "limited")
    assert out.splitlines() == [f"#{limited.pk} limited alice pending 0%"]


def test_jobs_refuses_a_type_that_neither_exists_nor_has_jobs(db):
    with pytest.raises(CommandError, match="--type: No job type named 'limitd'. Known job types: "):
        run("task_ferry_jobs", "--type", "limitd")


def test_jobs_refuses_a_type_name_no_row_can_hold(db):
    # PostgreSQL refuses a NUL in a query: the name is unknown without asking it.
    with pytest.raises(CommandError, match="--type: No job type named 'limit\\\\x00ed'"):
        run("task_ferry_jobs", "--type", "limit\x00ed")


@pytest.mark.parametrize("limit", ["0", "10001", "99999999999999999999"])
def test_jobs_refuses_a_limit_out_of_range(db, limit):
    # A limit past the database's integers failed with a traceback of its DataError.
    with pytest.raises(CommandError, match="^--limit must be from 1 to 10000, got "):
        run("task_ferry_jobs", "--limit", limit)


def test_jobs_filters_by_a_removed_type_that_still_has_jobs(user):
    job = make_job(user)
    Job.objects.filter(pk=job.pk).update(type="removed_type")
    get_store().delete([job.pk])
    out = run("task_ferry_jobs", "--type", "removed_type")
    assert out.splitlines() == [f"#{job.pk} removed_type alice pending 0%"]


def test_jobs_says_when_nothing_runs(db):
    assert run("task_ferry_jobs") == "No pending or running jobs.\n"


def test_jobs_draws_bars_on_a_terminal(live_jobs):
    _, running = live_jobs
    publish_progress(running, 50, "halfway")
    out = run("task_ferry_jobs", stdout=TerminalOutput())
    bar_line = next(line for line in out.splitlines() if line.startswith(f"#{running.pk}"))
    inside = bar_line[bar_line.index("[") + 1 : bar_line.index("]")]
    assert abs(inside.count("#") - inside.count(".")) <= 1
    assert "50%" in bar_line and "halfway" in bar_line


def test_jobs_draws_bars_with_use_tz_off(live_jobs, settings):
    # Projects started before Django 5.0 may still run with naive local times.
    settings.USE_TZ = False
    _, running = live_jobs
    # As a worker with these settings publishes it: from the row, a naive created_at.
    publish_progress(Job.objects.get(pk=running.pk), 50, "halfway")
    out = run("task_ferry_jobs", stdout=TerminalOutput())
    assert "pending or running job(s)" in out.splitlines()[0]
    assert "50%" in next(line for line in out.splitlines() if line.startswith(f"#{running.pk}"))


def script_sleeps(monkeypatch, *steps):
    """Replace the watch loop's sleep with ``steps``, run one per sleep: time passing."""
    pending = list(steps)

    def fake_sleep(seconds):
        assert pending, "the watch loop did not stop once no job was live"
        pending.pop(0)()

    monkeypatch.setattr(task_ferry_jobs, "sleep", fake_sleep)


def end_both(pending, running):
    JobHandler.cancel_job(pending)
    transition(running, JobState.FINISHED, from_states=[JobState.STARTED])


def test_watch_prints_a_line_per_change_when_not_a_terminal(live_jobs, monkeypatch):
    pending, running = live_jobs
    publish_progress(running, 10, "starting")
    script_sleeps(
        monkeypatch,
        lambda: publish_progress(running, 60, "busy"),
        lambda: None,  # nothing changes: nothing is printed
        lambda: end_both(pending, running),
    )
    out = run("task_ferry_jobs", "--watch", "--until-idle", "--interval", "0.01")
    lines = [re.sub(r" \(\d+:\d\d\)$", "", line) for line in out.splitlines()]
    assert lines == [
        f"#{pending.pk} scripted alice pending 0%",
        f"#{running.pk} scripted (system) started 10% starting",
        f"#{running.pk} scripted (system) started 60% busy",
        f"#{pending.pk} scripted alice cancelled 0%",
        f"#{running.pk} scripted (system) finished 60% busy",
    ]


def watch_on_a_terminal() -> str:
    """``task_ferry_jobs --watch --until-idle`` into a terminal, quickly; its output."""
    return run(
        "task_ferry_jobs", "--watch", "--until-idle", "--interval", "0.01", stdout=TerminalOutput()
    )


def test_watch_redraws_bars_on_a_terminal(live_jobs, monkeypatch):
    pending, running = live_jobs
    publish_progress(running, 25, "first")
    script_sleeps(
        monkeypatch,
        lambda: publish_progress(running, 75, "second"),
        lambda: end_both(pending, running),
    )
    out = watch_on_a_terminal()
    # Each redraw moves up over the whole previous frame (a header and two jobs) and clears it.
    frames = out.split("\x1b[3F\x1b[J")
    assert len(frames) == 3
    assert "25%" in frames[0] and "first" in frames[0]
    assert "75%" in frames[1] and "second" in frames[1]
    assert frames[2] == "No pending or running jobs.\n"


@pytest.mark.parametrize("interval", ["0", "1e-300", "nan", "inf", "86401"])
def test_jobs_rejects_bad_interval(db, interval):
    with pytest.raises(CommandError) as info:
        call_command("task_ferry_jobs", "--watch", "--interval", interval)
    assert str(info.value) == (
        f"--interval must be a number of seconds from 0.01 to 86400; got {float(interval)!r}."
    )


def test_jobs_until_idle_without_watch_says_what_it_needs(db):
    # It was ignored: the jobs shown once, as if the option meant nothing.
    with pytest.raises(CommandError) as info:
        call_command("task_ferry_jobs", "--until-idle")
    assert str(info.value) == (
        "--until-idle stops a --watch: add --watch, or leave --until-idle out to show the jobs "
        "once."
    )


def test_sweep_run_once_says_when_there_was_nothing_to_fail(db):
    # A silent exit left a user wondering whether it had run at all.
    assert run("task_ferry_sweep") == "No stale jobs.\n"


@pytest.mark.parametrize("interval", ["0", "1e-300", "nan", "inf"])
def test_sweep_rejects_bad_interval(db, interval):
    # 1e-300 was taken: a loop of sweeps without rest.
    with pytest.raises(CommandError, match="^--interval must be a number of seconds from 0.01 "):
        call_command("task_ferry_sweep", "--interval", interval)


THIRTY_MINUTES = datetime.timedelta(minutes=30)


def without_ages(text):
    return re.sub(r"\d+:\d\d:\d\d", "h:mm:ss", text)


def lost_half_an_hour_ago(settings):
    """A started job, with HEARTBEAT_TIMEOUT 60 s, whose last heartbeat was half an hour ago
    and whose snapshot is gone: one the sweep would have failed long ago."""
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_TIMEOUT": 60}
    lost = started_job(started_ago=datetime.timedelta(hours=1), beat_ago=THIRTY_MINUTES)
    get_store().delete([lost.pk])
    return lost


def test_jobs_says_after_its_listing_that_the_sweep_is_not_running(settings, db):
    """A job lost half an hour ago still shows started: the listing says why it stays so."""
    lost = lost_half_an_hour_ago(settings)

    lines = run("task_ferry_jobs").splitlines()

    assert len(lines) == 2
    assert lines[0].startswith(f"#{lost.pk} scripted (system) started 0% (")
    (message,) = sweep_messages()
    assert without_ages(lines[1]) == without_ages(f"task_ferry.W007: {message.msg} {message.hint}")


def test_jobs_says_nothing_of_the_sweep_while_it_may_yet_fail_the_jobs(settings, db):
    settings.TASK_FERRY = {**settings.TASK_FERRY, "HEARTBEAT_TIMEOUT": 60}
    # Lapsed, but the sweep's next round (a minute away at most) fails it.
    lapsed = started_job(
        started_ago=datetime.timedelta(hours=1), beat_ago=datetime.timedelta(minutes=2)
    )
    get_store().delete([lapsed.pk])
    out = run("task_ferry_jobs")
    assert "W007" not in out and len(out.splitlines()) == 1


def test_watch_says_the_sweep_is_not_running_once_when_not_a_terminal(settings, db, monkeypatch):
    lost = lost_half_an_hour_ago(settings)
    script_sleeps(
        monkeypatch,
        lambda: None,  # still lost: not said again
        lambda: transition(lost, JobState.FAILED, from_states=[JobState.STARTED]),
    )
    out = run("task_ferry_jobs", "--watch", "--until-idle", "--interval", "0.01")
    lines = out.splitlines()
    assert [line.startswith("task_ferry.W007: 1 started job(s)") for line in lines] == [
        False,
        True,
        False,
    ]
    assert lines[2] == f"#{lost.pk} scripted (system) failed 0%"


def test_watch_counts_unswept_jobs_at_most_once_a_minute(settings, db, monkeypatch):
    """W007's count queries scan the live jobs; a watch refreshing every second ran them at
    every refresh. In between, the last warning is shown again."""
    lost = lost_half_an_hour_ago(settings)
    clock = [1000.0]
    monkeypatch.setattr(task_ferry_jobs, "monotonic", lambda: clock[0])
    steps = [
        lambda: clock.__setitem__(0, clock[0] + 1),
        lambda: clock.__setitem__(0, clock[0] + 58),
        lambda: clock.__setitem__(0, clock[0] + 1),  # a minute since the first count
        lambda: transition(lost, JobState.FAILED, from_states=[JobState.STARTED]),
    ]
    queries = CaptureQueriesContext(connections[jobs_database()])
    counts_per_refresh = []
    refresh_started = 0

    def fake_sleep(seconds):
        nonlocal refresh_started
        refresh = queries.captured_queries[refresh_started:]
        counts_per_refresh.append(sum("COUNT(" in query["sql"].upper() for query in refresh))
        steps.pop(0)()
        refresh_started = len(queries.captured_queries)

    monkeypatch.setattr(task_ferry_jobs, "sleep", fake_sleep)
    with queries:
        out = watch_on_a_terminal()
    frames = re.split(r"\x1b\[\d+F\x1b\[J", out)

    assert counts_per_refresh[0] > 0
    assert counts_per_refresh == [counts_per_refresh[0], 0, 0, counts_per_refresh[0]]
    assert ["task_ferry.W007: 1 started job(s)" in frame for frame in frames] == [
        True,
        True,
        True,
        True,
        False,
    ]
    assert frames[-1] == "No pending or running jobs.\n"


def test_watch_bars_wrap_the_sweep_warning_and_redraw_over_it(settings, db, monkeypatch):
    lost = lost_half_an_hour_ago(settings)
    script_sleeps(
        monkeypatch,
        lambda: transition(lost, JobState.FAILED, from_states=[JobState.STARTED]),
    )
    out = watch_on_a_terminal()
    first, moved_up, last = re.split(r"\x1b\[(\d+)F\x1b\[J", out)
    lines = first.splitlines()
    assert "task_ferry.W007: 1 started job(s)" in lines[2]
    assert "--interval 60" in " ".join(lines[2:])
    # Each within the terminal's 100 columns, so the redraw moves up over all of them.
    assert all(len(line) < 100 for line in lines)
    assert int(moved_up) == len(lines) > 3
    assert last == "No pending or running jobs.\n"
