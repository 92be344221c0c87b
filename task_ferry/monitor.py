"""The monitor thread beside each running job: it publishes progress, watches for a cancel
request and beats the heart, so the job's own thread does no I/O on a tick."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from django.db import connections
from django.utils import timezone

from task_ferry.exceptions import ProgressStoreUnavailable
from task_ferry.models import Heartbeat, Job
from task_ferry.progress import Progress
from task_ferry.snapshot import isoformat, job_snapshot, truncate_state
from task_ferry.stores.base import CancelListener, ProgressStore

logger = logging.getLogger("task_ferry")

WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class JobMonitor(threading.Thread):
    def __init__(
        self,
        job: Job,
        progress: Progress,
        store: ProgressStore,
        *,
        publish_interval: float,
        heartbeat_interval: float | None,
        run_token: str = WORKER_NAME,
    ) -> None:
        super().__init__(name=f"task-ferry-monitor-{job.pk}", daemon=True)
        self.job = job
        self.progress = progress
        self.store = store
        self.publish_interval = publish_interval
        self.heartbeat_interval = heartbeat_interval
        # Held while publishing, so nothing is published after stop() returns.
        self._publish_lock = threading.Lock()
        self._stopped = False
        self._published: tuple[int, str] = (job.progress_percentage, job.progress_state)
        #: The heartbeat row this run owns (see ``JobRun``).
        self.run_token = run_token
        #: Set once the stale-job sweep has taken the job from this run.
        self.fenced = False
        self._beats = heartbeat_interval is not None

    def stop(self) -> tuple[int, str]:
        """Stop publishing (without waiting for the thread) and return the last numbers."""
        with self._publish_lock:
            self._stopped = True
        return self.current()

    def current(self) -> tuple[int, str]:
        return self.progress.percentage, truncate_state(self.progress._root.state)

    def run(self) -> None:
        listener: CancelListener | None = None
        next_beat = time.monotonic() + (self.heartbeat_interval or 0)
        try:
            listener = self._open_listener()
            while not self._stopped:
                # One bad iteration must not end the heartbeat of a job that is still running.
                try:
                    if listener is None:
                        time.sleep(self.publish_interval)
                        listener = self._open_listener()
                    elif self._wait_for_cancel(listener):
                        self.progress.request_cancel()
                    self._publish_if_changed()
                except Exception:
                    logger.exception("Job %s: monitor iteration failed", self.job.pk)
                    time.sleep(self.publish_interval)
                if self.heartbeat_interval is not None and time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + self.heartbeat_interval
        finally:
            if listener is not None:
                listener.close()
            if self._beats:
                connections.close_all()

    def _open_listener(self) -> CancelListener | None:
        try:
            return self.store.cancel_listener(self.job.pk)
        except ProgressStoreUnavailable as exc:
            logger.warning("Job %s: cannot watch for cancel requests: %s", self.job.pk, exc)
            return None

    def _wait_for_cancel(self, listener: CancelListener) -> bool:
        try:
            return listener.wait(self.publish_interval)
        except ProgressStoreUnavailable as exc:
            logger.warning("Job %s: %s", self.job.pk, exc)
            time.sleep(self.publish_interval)
            return False

    def _publish_if_changed(self) -> None:
        current = self.current()
        if current == self._published:
            return
        with self._publish_lock:
            if self._stopped:
                return
            snapshot: dict[str, Any] = job_snapshot(self.job)
            snapshot["progress_percentage"], snapshot["progress_state"] = current
            snapshot["updated_at"] = isoformat(timezone.now())
            try:
                self.store.write(self.job.pk, snapshot)
            except ProgressStoreUnavailable as exc:
                logger.warning("Job %s: progress not published: %s", self.job.pk, exc)
                return
            self._published = current

    def _beat(self) -> None:
        try:
            beaten = Heartbeat.objects.filter(job_id=self.job.pk, worker=self.run_token).update(
                beat_at=timezone.now()
            )
        except Exception:
            logger.exception("Job %s: heartbeat failed", self.job.pk)
            connections.close_all()
            return
        if not beaten and not self._stopped:
            # The sweep failed this job as lost; stop the work at its next tick.
            logger.warning("Job %s was taken from this worker by the stale-job sweep.", self.job.pk)
            self.fenced = True
            self.heartbeat_interval = None
            self.progress.request_cancel()
