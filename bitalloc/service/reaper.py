"""The reaper: retries or fails jobs whose worker is gone (their lease expired) or that ran
past their deadline, and re-enqueues queued jobs that no queue message holds (the API died
between its commit and the enqueue, Redis lost its data or was down); run by the API and by
every ``bitalloc worker``."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from bitalloc.service import jobs
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import utcnow

log = logging.getLogger("bitalloc.worker")


class Reaper:
    """Periodically retries or fails jobs whose worker is gone; several reapers may run at
    once (API replicas, workers): each settle is a compare-and-set, so a job is settled once."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)

    def reap_once(self) -> list[uuid.UUID]:
        with transaction(self.ctx.sessions) as session:
            requeued = jobs.reap(session)
        for job_id, attempt in requeued:
            self.ctx.queue.enqueue(job_id, attempt)
        return [job_id for job_id, _ in requeued]

    def reconcile_once(self) -> list[uuid.UUID]:
        """Re-enqueue the jobs queued longer than ``requeue_seconds`` whose message is gone; a
        message sent twice is harmless (a worker claims a job with a compare-and-set)."""
        cutoff = utcnow() - timedelta(seconds=self.ctx.settings.requeue_seconds)
        with self.ctx.sessions() as session:
            waiting = jobs.waiting(session, cutoff)
        sent = []
        for job_id, attempt in waiting:
            if self.ctx.queue.pending(job_id, attempt):
                continue
            self.ctx.queue.enqueue(job_id, attempt)
            with transaction(self.ctx.sessions) as session:
                jobs.add_log(session, job_id, "queued again: no queue message held this job", "warning")
            sent.append(job_id)
        return sent

    def _loop(self) -> None:
        while not self._stop.wait(self.ctx.settings.reaper_seconds):
            for step in (self.reap_once, self.reconcile_once):
                try:
                    step()
                except Exception:
                    log.exception("reaper pass failed (%s)", step.__name__)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
