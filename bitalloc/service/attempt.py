"""One attempt: a run of one job under a lease, with its heartbeat, progress and stop checks.

A heartbeat thread renews the lease (and stores progress) every ``heartbeat_seconds``; the
pipeline's progress callback stops the run (``Stop``) when a cancel was requested, the
deadline passed, the worker is shutting down, or the lease was lost to another attempt.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from bitalloc.service import jobs
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.progress import ProgressTracker

log = logging.getLogger("bitalloc.worker")

PROGRESS_WRITE_SECONDS = 1.0


class Stop(Exception):
    """Raised from the progress callback to end an attempt early; ``why`` says why."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why


class Attempt:
    """One run of one job under a lease."""

    def __init__(self, ctx: Context, job_id: uuid.UUID, owner: str, timeout: float, stopping: threading.Event) -> None:
        self.ctx, self.job_id, self.owner, self.timeout = ctx, job_id, owner, timeout
        self.deadline = time.monotonic() + timeout
        self.stopping = stopping
        self.tracker = ProgressTracker()
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._last_write = 0.0

    def progress(self, done: int, total: int, phase: str) -> None:
        """The pipeline's callback: record progress, and stop the run when it must stop."""
        if self.tracker.update(done, total, phase):
            self.log(f"{phase}: started")
            self.beat()
        elif time.monotonic() - self._last_write >= PROGRESS_WRITE_SECONDS:
            self.beat()
        self.check()

    def check(self) -> None:
        if self.lost.is_set():
            raise Stop("lost", "another worker owns this job now (this worker's lease expired)")
        if self.cancel_requested.is_set():
            raise Stop("canceled", "canceled by request")
        if time.monotonic() > self.deadline:
            raise Stop("timeout", f"timed out: still running {self.timeout:g} s after it started (job_timeout)")
        if self.stopping.is_set():
            raise Stop("stopping", "worker shutting down")

    def beat(self) -> None:
        self._last_write = time.monotonic()
        with transaction(self.ctx.sessions) as session:
            state = jobs.beat(session, self.job_id, self.owner, self.ctx.settings.lease_seconds, self.tracker.snapshot())
        if not state.alive:
            self.lost.set()
        if state.cancel_requested:
            self.cancel_requested.set()

    def log(self, message: str, level: str = "info") -> None:
        with transaction(self.ctx.sessions) as session:
            jobs.add_log(session, self.job_id, message, level)

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew the lease on a thread, so a long step without progress reports keeps it."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.ctx.settings.heartbeat_seconds):
                try:
                    self.beat()
                except Exception:  # a database hiccup: the next beat retries; the lease has slack
                    log.exception("heartbeat for job %s failed", self.job_id)

        thread = threading.Thread(target=loop, name=f"heartbeat-{self.job_id.hex[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
