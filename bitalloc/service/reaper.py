"""The reaper: retries or fails jobs whose worker is gone (their lease expired) or that ran
past their deadline; run by the API and by every ``bitalloc worker``."""

from __future__ import annotations

import logging
import threading
import uuid

from bitalloc.service import jobs
from bitalloc.service.context import Context
from bitalloc.service.db import transaction

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

    def _loop(self) -> None:
        while not self._stop.wait(self.ctx.settings.reaper_seconds):
            try:
                self.reap_once()
            except Exception:
                log.exception("reaper pass failed")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
