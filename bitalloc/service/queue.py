"""How a submitted job reaches a worker.

The database is the record of every job; a queue only carries "job X is ready" to a worker.
``LocalQueue`` (embedded) wakes the in-process worker threads, which claim queued jobs from
the database; ``RQQueue`` (scaled out) puts the id on Redis for ``bitalloc worker``. Either
way a worker claims a job with a compare-and-set on its state, so a message delivered twice
runs the job once. A message can still be lost (the API dies between its commit and the
enqueue, Redis loses its data, Redis is down at submit): the reaper re-enqueues a queued job
that no message holds (``pending``) once it has waited a grace period, so every stored job
eventually runs.
"""

from __future__ import annotations

import threading
import uuid
from typing import Protocol

EXECUTE = "bitalloc.service.worker.execute"


class JobQueue(Protocol):
    def enqueue(self, job_id: uuid.UUID, attempt: int) -> None:
        """Make a queued job (about to start attempt ``attempt``) reach a worker; a no-op when a
        message for that attempt is already waiting or running, so concurrent senders send one."""

    def check(self) -> None:
        """Raise when the queue cannot take jobs (readiness)."""

    def pending(self, job_id: uuid.UUID, attempt: int) -> bool:
        """Whether a message for this attempt is waiting for a worker or being run."""


class LocalQueue:
    """The embedded queue: the database holds the jobs, this event wakes the workers."""

    def __init__(self) -> None:
        self.wakeup = threading.Event()

    def enqueue(self, job_id: uuid.UUID, attempt: int) -> None:
        self.wakeup.set()

    def check(self) -> None:
        return None

    def pending(self, job_id: uuid.UUID, attempt: int) -> bool:
        """Always: the workers poll the database itself, so no message can be lost."""
        return True


class RQQueue:
    """RQ on Redis; a job that outlives ``job_timeout`` (plus a grace period in which the job's
    own deadline check reports it) is killed by RQ and failed by the reaper."""

    GRACE_SECONDS = 60
    SEND_LOCK_SECONDS = 10

    def __init__(self, redis_url: str, name: str, job_timeout: float) -> None:
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(redis_url)
        self.rq = Queue(name, connection=self.redis)
        self.job_timeout = int(job_timeout) + self.GRACE_SECONDS

    LIVE = ("queued", "started", "deferred", "scheduled")

    @staticmethod
    def message_id(job_id: uuid.UUID, attempt: int) -> str:
        return f"bitalloc-{job_id.hex}-{attempt}"

    def enqueue(self, job_id: uuid.UUID, attempt: int) -> None:
        """Check and send under a short Redis lock: the submitting request and a replayed one (or
        the reaper) can both find the job unsent, and without the lock both would push it."""
        message = self.message_id(job_id, attempt)
        lock = self.redis.lock(f"{message}:sending", timeout=self.SEND_LOCK_SECONDS)
        if not lock.acquire(blocking=True, blocking_timeout=self.SEND_LOCK_SECONDS):
            return
        try:
            if not self.pending(job_id, attempt):
                self.rq.enqueue(EXECUTE, str(job_id), job_id=message,
                                job_timeout=self.job_timeout, result_ttl=3600, failure_ttl=7 * 86400)
        finally:
            lock.release()

    def check(self) -> None:
        self.redis.ping()

    def pending(self, job_id: uuid.UUID, attempt: int) -> bool:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            message = Job.fetch(self.message_id(job_id, attempt), connection=self.redis)
        except NoSuchJobError:
            return False
        return message.get_status(refresh=False) in self.LIVE
