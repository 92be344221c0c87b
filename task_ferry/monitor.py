"""The monitor: one thread per worker process, serving every job running in that process.

It publishes each job's progress to the store at most once per ``PUBLISH_INTERVAL`` (newest
numbers win), hands cancel requests pushed by the store to the jobs' ``Progress``, and beats
the jobs' heartbeats. The jobs' own threads never wait on any of this: a tick only updates
numbers in memory.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from django.db import connections
from django.db.models import Exists, OuterRef
from django.utils import timezone

from task_ferry.conf import ferry_settings
from task_ferry.exceptions import ProgressStoreUnavailable
from task_ferry.models import CancelRequest, Heartbeat, Job, JobState, jobs_database
from task_ferry.progress import Progress
from task_ferry.snapshot import cancel_token, isoformat, job_snapshot, truncate_state
from task_ferry.stores.base import CancelListener, ProgressStore, get_store

__all__ = ["JobMonitor", "Watch", "get_monitor"]

logger = logging.getLogger("task_ferry")

# Counts on while the machine is suspended (a paused VM), unlike time.monotonic() on Linux.
BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)

# Seconds without running jobs after which the monitor drops its cancel subscription and sleeps.
IDLE_CLOSE_AFTER = 30.0
# Seconds between attempts to reach a store that went away.
RETRY_AFTER = 1.0
# Longest a CPU-bound job thread may hold the GIL while the monitor waits for it (CPython's
# default is 5 ms, and one publication needs the GIL back after each of its socket calls).
GIL_SWITCH_INTERVAL = 0.001
# Longest single wait, so new jobs and changed settings are picked up soon whatever the intervals.
MAX_WAIT = 0.1


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def awake_clock() -> float:
    """Seconds for the deleted-job check: the stale-job sweep, on another host, goes by wall
    time, which a suspended machine's ``time.monotonic()`` does not keep up with."""
    return time.monotonic() if BOOTTIME is None else time.clock_gettime(BOOTTIME)


class Watch:
    """One running job as the monitor sees it. ``stop()`` ends it."""

    __slots__ = (
        "_monitor",
        "beaten_at",
        "cancel_checked",
        "cancel_token",
        "deadline",
        "gone_at",
        "heartbeat",
        "job",
        "progress",
        "published",
        "published_at",
        "snapshot",
        "time_limit",
        "visible",
    )

    def __init__(
        self,
        monitor: JobMonitor,
        job: Job,
        progress: Progress,
        *,
        heartbeat: bool,
        visible: bool,
        time_limit: float | None = None,
    ) -> None:
        self._monitor = monitor
        self.job = job
        self.progress = progress
        self.heartbeat = heartbeat
        #: Seconds the run may take, and when (``time.monotonic()``) it has taken them; None
        #: without a limit.
        self.time_limit = time_limit
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        #: Whether other connections see the job's row (it does not run inside a caller's
        #: transaction), so that the monitor can ask the database about it.
        self.visible = visible
        #: The job's snapshot, built at its first publication (most short jobs end before
        #: one); each publication updates its progress.
        self.snapshot: dict[str, Any] | None = None
        #: The numbers last published; None until the start snapshot has been, and again
        #: once the store was found unreachable.
        self.published: tuple[int, str] | None = None
        #: When they were (``time.monotonic()``).
        self.published_at = 0.0
        #: Whether the store was asked for a cancel request made before the monitor listened.
        self.cancel_checked = False
        self.cancel_token = cancel_token(job)
        #: When its last heartbeat row was written, or the run started (``awake_clock()``).
        self.beaten_at = awake_clock()
        #: When the monitor found its row deleted; None while it has not.
        self.gone_at: float | None = None

    def current(self) -> tuple[int, str]:
        """The job's percentage and (column-sized) label right now."""
        progress = self.progress
        return progress.percentage, truncate_state(progress.state)

    def deleted_while_started(self) -> bool:
        """Whether the job, whose row is gone, was still ``started`` when it was deleted: the
        stale-job sweep, the one other party that ends a running job (and runs its
        ``on_error``), fails it only once its heartbeat lapsed for ``HEARTBEAT_TIMEOUT``."""
        gone_at = awake_clock() if self.gone_at is None else self.gone_at
        return gone_at - self.beaten_at < ferry_settings.HEARTBEAT_TIMEOUT

    def stop(self) -> tuple[int, str]:
        """Stop publishing this job and return its last numbers. Once this returns, the monitor
        writes nothing more for the job, so the caller's final snapshot is never overwritten."""
        self._monitor.unwatch(self)
        return self.current()


class JobMonitor:
    """Serves the jobs running in this process from one daemon thread, started on first use."""

    def __init__(self) -> None:
        self._watches: dict[int, Watch] = {}
        # Guards _watches; held while snapshots are written, so stop() waits for a write in flight.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_down = False

    def watch(
        self,
        job: Job,
        progress: Progress,
        *,
        heartbeat: bool,
        visible: bool,
        time_limit: float | None = None,
    ) -> Watch:
        """Start publishing ``job``'s progress, its start first, and delivering its cancel
        requests. ``heartbeat``: write its heartbeat rows; ``visible``: its row is committed,
        so cancel requests recorded in the database and ends made elsewhere are read for it;
        ``time_limit``: seconds after which its next tick stops it. If it raises, it leaves
        the job unwatched."""
        watch = Watch(
            self, job, progress, heartbeat=heartbeat, visible=visible, time_limit=time_limit
        )
        try:
            with self._lock:
                self._watches[job.pk] = watch
                if self._thread is None or not self._thread.is_alive():
                    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
                    self._thread = threading.Thread(
                        target=self._run, name="task-ferry-monitor", daemon=True
                    )
                    self._thread.start()
            self._wake.set()
        except BaseException:
            # "can't start new thread", or Ctrl-C while start() waits for the thread: the
            # caller gets no watch to stop, so none is left behind.
            self.unwatch(watch)
            raise
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(watch.job.pk) is watch:
                del self._watches[watch.job.pk]

    def cancel_local(self, job_id: int) -> bool:
        """Cancel the job at its next tick if it runs in this process; False if it does not."""
        watch = self._watches.get(job_id)
        if watch is None:
            return False
        watch.progress.request_cancel()
        return True

    def _run(self) -> None:
        loop = _MonitorLoop(self)
        while True:
            try:
                loop.step()
            except Exception:
                # The monitor must outlive any bug or outage; the jobs depend on it.
                logger.exception("task_ferry monitor: unexpected error; carrying on")
                time.sleep(RETRY_AFTER)

    def _watching(self) -> list[Watch]:
        with self._lock:
            return list(self._watches.values())

    def _cancel(self, job_ids: set[int] | list[int]) -> None:
        for job_id in job_ids:
            self.cancel_local(job_id)

    def _publish(self, store: ProgressStore) -> None:
        with self._lock:
            batch: dict[Watch, tuple[int, str]] = {}
            # A job whose numbers stay put for long is published again before its snapshot
            # expires: a poll would otherwise get the row, which has no progress until the end.
            now = time.monotonic()
            stale_before = now - store.timeout / 2
            for watch in self._watches.values():
                current = watch.current()
                if current != watch.published or watch.published_at < stale_before:
                    batch[watch] = current
            if not batch:
                return
            updated_at = isoformat(timezone.now())
            snapshots = {}
            for watch, (percentage, label) in batch.items():
                snapshot = watch.snapshot
                if snapshot is None:
                    snapshot = watch.snapshot = job_snapshot(watch.job)
                snapshot["progress_percentage"] = percentage
                snapshot["progress_state"] = label
                snapshot["updated_at"] = updated_at
                snapshots[watch.job.pk] = snapshot
            try:
                store.write_many(snapshots)
            except ProgressStoreUnavailable as exc:
                self._report_store_down(exc)
                return
            self._report_store_up()
            for watch, current in batch.items():
                watch.published = current
                watch.published_at = now

    def _report_store_down(self, exc: Exception) -> None:
        # It may come back empty (a restart): every job is published again once it answers.
        for watch in list(self._watches.values()):
            watch.published = None
        # Once per outage: a warning per interval would flood the logs.
        if not self._store_down:
            self._store_down = True
            logger.warning(
                "task_ferry monitor: progress store unavailable. Running jobs carry on: their "
                "progress shows once each ends or the store is back, and cancel requests reach "
                "them through the database at each heartbeat. Check that the store is running "
                "and reachable from this worker. %s",
                exc,
            )

    def _report_store_up(self) -> None:
        if self._store_down:
            self._store_down = False
            logger.warning(
                "task_ferry monitor: progress store reachable again; publishing progress and "
                "taking cancel requests from it again."
            )

    def _forget_deleted(self, job_ids: set[int], found_at: float) -> None:
        """Stop the running jobs whose rows were deleted at their next tick, as if cancelled:
        their work would be rolled back at their end, which finds no row. Stop publishing
        them too, and take their snapshots out of the store again: a publication since the
        delete would show them ``started`` until their runs end."""
        with self._lock:
            watches = [w for w in self._watches.values() if w.job.pk in job_ids]
            for watch in watches:
                del self._watches[watch.job.pk]
                watch.gone_at = found_at
                watch.progress.request_cancel()
        if not watches:
            # Their runs ended before the query: they forgot the jobs themselves.
            return
        forgotten = sorted(w.job.pk for w in watches)
        logger.info("Jobs %s were deleted while they ran; stopping them.", forgotten)
        try:
            get_store().delete(forgotten)
        except ProgressStoreUnavailable as exc:
            self._report_store_down(exc)

    def _beat(self, watches: list[Watch]) -> None:
        visible_ids = [w.job.pk for w in watches if w.visible]
        if not visible_ids:
            return
        job_ids = [w.job.pk for w in watches if w.heartbeat and w.visible]
        # No later than the beat_at written, which the stale-job sweep goes by.
        beaten_at = awake_clock()
        now = timezone.now()
        name = worker_name()
        try:
            # A job the stale-job sweep ended meanwhile (this worker was frozen, say) is stopped
            # at its next tick; its finish would be refused anyway.
            # Cancel requests recorded in the database while the store was down arrive here too,
            # for jobs run without heartbeat rows as well.
            # Every row, not only the flagged ones: a job whose row is missing was deleted.
            # Where the jobs are written: on a lagging replica a job just started looks deleted.
            rows = (
                Job.objects.using(jobs_database())
                .filter(pk__in=visible_ids)
                .annotate(
                    cancel_requested=Exists(CancelRequest.objects.filter(job_id=OuterRef("pk")))
                )
                .values_list("pk", "state", "cancel_requested")
            )
            states: dict[int, str] = {}
            flagged: set[int] = set()
            for pk, state, cancel_requested in rows:
                states[pk] = state
                if state != JobState.STARTED or cancel_requested:
                    flagged.add(pk)
            deleted = set(visible_ids) - states.keys()
            if deleted:
                job_ids = [job_id for job_id in job_ids if job_id not in deleted]
                # Found after the query: the rows were deleted before it answered.
                self._forget_deleted(deleted, awake_clock())
                # The previous beat may have written their heartbeats after the delete (it read
                # the rows before): nothing else would remove those.
                forget_heartbeats(deleted)
            ended = {pk for pk in flagged if states[pk] != JobState.STARTED}
            if ended:
                job_ids = [job_id for job_id in job_ids if job_id not in ended]
                # A run stops its watch before committing its own end: an ended job no longer
                # watched ended here, while the query ran.
                ended_elsewhere = ended & {w.job.pk for w in self._watching()}
                if ended_elsewhere:
                    logger.warning(
                        "Jobs %s were ended elsewhere; stopping them here.", sorted(ended_elsewhere)
                    )
            self._cancel(flagged)
            connection = connections[Heartbeat.objects.db]
            conflict_target = (
                ["job"] if connection.features.supports_update_conflicts_with_target else None
            )
            Heartbeat.objects.bulk_create(
                [Heartbeat(job_id=job_id, worker=name, beat_at=now) for job_id in job_ids],
                update_conflicts=True,
                unique_fields=conflict_target,
                update_fields=["worker", "beat_at"],
            )
            beaten = set(job_ids)
            for watch in watches:
                if watch.job.pk in beaten:
                    watch.beaten_at = beaten_at
        except Exception:
            logger.exception("task_ferry monitor: heartbeat of jobs %s failed", visible_ids)
        finally:
            # Beats are seconds apart: holding a connection open in between buys nothing.
            connections.close_all()


class _MonitorLoop:
    """The monitor thread's state between iterations."""

    def __init__(self, monitor: JobMonitor) -> None:
        self.monitor = monitor
        self.listener: CancelListener | None = None
        self.listener_store: ProgressStore | None = None
        now = time.monotonic()
        self.next_listen_attempt = now
        self.last_publish = now - 3600
        self.last_poll = now - 3600
        self.last_beat = now
        self.idle_since: float | None = None

    def step(self) -> None:
        monitor = self.monitor
        monitor._wake.clear()
        watches = monitor._watching()
        now = time.monotonic()
        if not watches:
            self._sleep_while_idle(now)
            return
        self.idle_since = None
        store = get_store()
        interval = ferry_settings.PUBLISH_INTERVAL
        if store.supports_push:
            self._keep_listening(store, watches, now)
        elif self.listener is not None:
            # The store changed to one without push: a listener on the old one hears nothing.
            self._drop_listener(watches)
        if self.listener is None:
            # No push: ask the store about every job, once per interval.
            if now - self.last_poll >= interval:
                self._check_cancel_requests(store, watches)
                self.last_poll = now
        else:
            unchecked = [w for w in watches if not w.cancel_checked]
            if unchecked:
                self._check_cancel_requests(store, unchecked)
        if now - self.last_publish >= interval:
            monitor._publish(store)
            self.last_publish = now
        heartbeat_interval = ferry_settings.HEARTBEAT_INTERVAL
        if now - self.last_beat >= heartbeat_interval:
            monitor._beat(watches)
            self.last_beat = now
        due = min(
            self.last_publish + interval,
            self.last_beat + heartbeat_interval,
            stop_overdue(watches, now),
        )
        timeout = min(MAX_WAIT, max(0.0, due - time.monotonic()))
        if self.listener is None:
            monitor._wake.wait(timeout)
            return
        try:
            monitor._cancel(self.listener.wait(timeout))
        except ProgressStoreUnavailable as exc:
            monitor._report_store_down(exc)
            self._drop_listener(watches)

    def _sleep_while_idle(self, now: float) -> None:
        """With no jobs, keep the subscription a while (jobs often come in a row), then sleep
        until a job is watched."""
        if self.idle_since is None:
            self.idle_since = now
        if self.listener is not None and now - self.idle_since < IDLE_CLOSE_AFTER:
            try:
                # A job watched meanwhile may already have been asked to stop.
                interval = ferry_settings.PUBLISH_INTERVAL
                self.monitor._cancel(self.listener.wait(min(MAX_WAIT, interval)))
            except ProgressStoreUnavailable:
                self._drop_listener([])
            return
        self._drop_listener([])
        # A job type's serializer may have queried from this thread (the start snapshot): no
        # connection is kept while the monitor sleeps.
        connections.close_all()
        self.monitor._wake.wait()
        self.idle_since = None
        # Short jobs need no heartbeat: the sweep judges them by started_at.
        self.last_beat = time.monotonic()

    def _keep_listening(self, store: ProgressStore, watches: list[Watch], now: float) -> None:
        if self.listener is not None and self.listener_store is store:
            return
        self._drop_listener(watches)
        if now < self.next_listen_attempt:
            return
        try:
            self.listener = store.cancel_listener()
        except ProgressStoreUnavailable as exc:
            self.monitor._report_store_down(exc)
            self.next_listen_attempt = now + RETRY_AFTER
            return
        self.listener_store = store

    def _drop_listener(self, watches: list[Watch]) -> None:
        if self.listener is not None:
            self.listener.close()
        self.listener = None
        self.listener_store = None
        # Requests published while nobody listened must be read from the store.
        for watch in watches:
            watch.cancel_checked = False

    def _check_cancel_requests(self, store: ProgressStore, watches: list[Watch]) -> None:
        if not watches:
            return
        try:
            requested = store.cancel_requests([w.job.pk for w in watches])
        except ProgressStoreUnavailable as exc:
            self.monitor._report_store_down(exc)
            return
        for watch in watches:
            watch.cancel_checked = True
            if requested.get(watch.job.pk) == watch.cancel_token:
                watch.progress.request_cancel()


def stop_overdue(watches: list[Watch], now: float) -> float:
    """Stop, at their next tick, the jobs that ran out of time (a job already asked to cancel
    stays a cancel); returns when the next of the others will, ``inf`` if none has a limit."""
    next_deadline = math.inf
    for watch in watches:
        deadline, time_limit = watch.deadline, watch.time_limit
        if deadline is None or time_limit is None:
            continue
        if deadline > now:
            next_deadline = min(next_deadline, deadline)
        elif not watch.progress.cancel_requested:
            # Not yet stopped, for its time limit or by a cancel.
            logger.warning(
                "Job %s (%s) ran longer than its time limit of %g s; stopping it at its next tick.",
                watch.job.pk,
                watch.job.type,
                time_limit,
            )
            watch.progress.stop_at_time_limit(time_limit)
    return next_deadline


_monitor: JobMonitor | None = None
_monitor_pid: int | None = None
_monitor_lock = threading.Lock()


def forget_heartbeats(job_ids: Iterable[int]) -> None:
    """Delete the heartbeat rows of jobs whose rows were deleted. Deleting a job deletes its
    heartbeat, but a beat that read the job before the delete writes it again afterwards (no
    foreign-key constraint stops it)."""
    Heartbeat.objects.filter(job_id__in=list(job_ids)).delete()


def get_monitor() -> JobMonitor:
    """This process's monitor. A forked child (a prefork worker) gets its own."""
    global _monitor, _monitor_pid
    pid = os.getpid()
    if _monitor is None or _monitor_pid != pid:
        with _monitor_lock:
            if _monitor is None or _monitor_pid != pid:
                _monitor = JobMonitor()
                _monitor_pid = pid
    return _monitor
