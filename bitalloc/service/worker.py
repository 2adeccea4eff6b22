"""Workers: run claimed jobs and record what happens: a ``compress`` job through
``pipeline.run.run_job``, an ``artifact`` job (a point's packed artifact) through
``service.builds.run``.

One attempt holds a lease on its job. A heartbeat thread renews it (and stores progress)
every ``heartbeat_seconds``; the pipeline's progress callback stops the run when a cancel
was requested, the deadline passed, or the lease was lost. A worker that dies stops
renewing, and the reaper (``Reaper``; run by the API and by ``bitalloc worker``) retries
or fails its job. Results are written in the same transaction as the job's success, and
only while this attempt still owns the lease.

Two ways to get jobs: ``execute`` is the RQ entry point (scaled out, ``bitalloc worker``);
``LocalWorkers`` are threads inside the API process (the embedded default).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy.orm import Session

from bitalloc.search import SearchError
from bitalloc.service import builds, jobs, results
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import Job
from bitalloc.pipeline.run import run_job
from bitalloc.service.progress import ProgressTracker
from bitalloc.service.queue import LocalQueue
from bitalloc.service.schemas import JobCreate
from bitalloc.service.settings import get_settings

log = logging.getLogger("bitalloc.worker")

# Failures that are the job's own (bad input, unknown model, infeasible budget, a solver
# that gave up): the job fails with the message, and a retry would fail the same way.
JOB_ERRORS = (ValueError, FileNotFoundError, SearchError)
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


@dataclass(frozen=True)
class Stored:
    """What a run's results left in the database: the job's ``result`` and the log line."""

    result: dict
    message: str
    profile_id: int | None = None


# A finished run's results, written by this callback inside the transaction of the job's success.
Store = Callable[[Session], Stored]


class Executor:
    """Claims and runs jobs for one worker (a thread or an RQ work horse)."""

    def __init__(self, ctx: Context, stopping: threading.Event | None = None) -> None:
        self.ctx = ctx
        self.stopping = stopping or threading.Event()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"

    def run(self, job_id: uuid.UUID) -> str | None:
        """Run one queued job; returns its final state, or None when it was not ours to run."""
        return self._start(lambda session, owner: jobs.claim(session, job_id, owner, self.ctx.settings.lease_seconds))

    def run_next(self) -> str | None:
        """Claim and run the oldest queued job (embedded mode); None when there is none."""
        return self._start(lambda session, owner: jobs.claim_next(session, owner, self.ctx.settings.lease_seconds))

    def _start(self, claim: Callable[[Session, str], Job | None]) -> str | None:
        owner = uuid.uuid4().hex
        with transaction(self.ctx.sessions) as session:
            job = claim(session, owner)
            if job is None:
                return None
            jobs.add_log(session, job.id, f"attempt {job.attempts} of {job.max_attempts} on {self.name}")
        attempt = Attempt(self.ctx, job.id, owner, job.timeout_seconds, self.stopping)
        work = self._build if job.kind == "artifact" else self._compress
        try:
            with attempt.heartbeat():
                store = work(job, attempt)
                attempt.check()  # a cancel or timeout noticed after the last progress report
        except Stop as stop:
            return self._stopped(attempt, stop)
        except ValidationError as exc:
            return self._fail(attempt, f"invalid job spec: {exc}")
        except JOB_ERRORS as exc:
            return self._fail(attempt, str(exc))
        except Exception as exc:  # a bug or the machine (out of memory, ...): the traceback goes to the server log
            log.exception("job %s failed", job.id)
            return self._fail(attempt, f"internal error: {type(exc).__name__}: {exc}")
        return self._succeed(attempt, store)

    def _compress(self, job: Job, attempt: Attempt) -> Store:
        """Run the pipeline; its front, points and profile are stored with the job's success."""
        settings = self.ctx.settings
        result = run_job(JobCreate.model_validate(job.spec).to_spec(), profile_dir=settings.profile_dir,
                         policy=settings.load_policy(), progress=attempt.progress)
        profile_path = settings.profile_dir / f"{result.profile.meta['key']}.npz"

        def store(session: Session) -> Stored:
            profile = results.store_profile(session, self.ctx.storage, profile_path, result)
            summary = results.store(session, session.get_one(Job, job.id), result, profile)
            return Stored(summary, f"succeeded: {len(result.front)} front points stored", profile.id)

        return store

    def _build(self, job: Job, attempt: Attempt) -> Store:
        """Build and store the point's artifact tar; its ``Artifact`` row is written with the success."""
        with self.ctx.sessions() as session:
            inputs = builds.inputs(session, job.id)
        packed = builds.run(inputs, self.ctx.storage, self.ctx.settings.data_dir / "builds",
                            self.ctx.settings.load_policy(), attempt.progress)

        def store(session: Session) -> Stored:
            artifact = builds.store(session, job.id, packed)
            return Stored({"artifact_id": str(artifact.id), "sha256": artifact.sha256, "size": artifact.size},
                          f"succeeded: artifact {artifact.name} ({artifact.size} bytes, sha256 {artifact.sha256})")

        return store

    def _succeed(self, attempt: Attempt, store: Store) -> str | None:
        attempt.tracker.finish()
        try:
            with transaction(self.ctx.sessions) as session:
                stored = store(session)
                if not jobs.finish(session, attempt.job_id, attempt.owner, "succeeded", progress=attempt.tracker.snapshot(),
                                   result=stored.result, profile_id=stored.profile_id):
                    raise _NotOurs()
                jobs.add_log(session, attempt.job_id, stored.message)
        except _NotOurs:
            # Rolled back: canceled meanwhile, or the lease went to another attempt.
            return self._stopped(attempt, Stop("canceled", "canceled by request"))
        except Exception as exc:
            log.exception("storing results of job %s failed", attempt.job_id)
            return self._fail(attempt, f"internal error while storing results: {type(exc).__name__}: {exc}")
        return "succeeded"

    def _stopped(self, attempt: Attempt, stop: Stop) -> str | None:
        if stop.why == "lost":
            log.warning("job %s: %s", attempt.job_id, stop)
            return None
        if stop.why == "timeout":
            return self._fail(attempt, str(stop))
        with transaction(self.ctx.sessions) as session:
            if stop.why == "stopping":
                if jobs.release(session, attempt.job_id, attempt.owner):
                    jobs.add_log(session, attempt.job_id, "worker shut down: job returned to the queue", "warning")
                return "queued"
            if jobs.finish(session, attempt.job_id, attempt.owner, "canceled", error=str(stop)):
                jobs.add_log(session, attempt.job_id, "canceled")
                return "canceled"
        return None

    def _fail(self, attempt: Attempt, reason: str) -> str | None:
        with transaction(self.ctx.sessions) as session:
            if not jobs.finish(session, attempt.job_id, attempt.owner, "failed", error=reason,
                               progress=attempt.tracker.snapshot()):
                return None
            jobs.add_log(session, attempt.job_id, f"failed: {reason}", "error")
        return "failed"


class _NotOurs(Exception):
    """The success write found the job no longer ours to finish."""


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


class LocalWorkers:
    """The embedded default's workers: threads that claim queued jobs from the database."""

    POLL_SECONDS = 2.0

    def __init__(self, ctx: Context, threads: int) -> None:
        if not isinstance(ctx.queue, LocalQueue):
            raise ValueError("local workers need the embedded queue (no redis_url)")
        self.ctx, self.wakeup = ctx, ctx.queue.wakeup
        self.stopping = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"bitalloc-worker-{i}", daemon=True)
                         for i in range(threads)]

    def _loop(self) -> None:
        executor = Executor(self.ctx, self.stopping)
        while not self.stopping.is_set():
            try:
                if executor.run_next() is not None:
                    continue
            except Exception:
                log.exception("embedded worker failed to run a job")
            self.wakeup.wait(self.POLL_SECONDS)
            self.wakeup.clear()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job stops at its next progress report and is requeued."""
        self.stopping.set()
        self.wakeup.set()
        for thread in self._threads:
            thread.join(timeout=timeout)


_contexts: dict[int, Context] = {}


def _forget_parent_connections() -> None:
    """A forked child must not use (or close) its parent's pooled connections."""
    for ctx in _contexts.values():
        ctx.engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def use_context(ctx: Context) -> None:
    """Make ``execute`` in this process use ``ctx`` (tests, and ``bitalloc worker`` for its own pid)."""
    _contexts[os.getpid()] = ctx


def process_context() -> Context:
    """This process's context: a forked RQ work horse builds its own (connections do not survive a fork)."""
    pid = os.getpid()
    if pid not in _contexts:
        _contexts[pid] = Context.create(get_settings().model_copy(update={"auto_migrate": False}))
    return _contexts[pid]


def execute(job_id: str) -> str | None:
    """The RQ job function: run the job with this id (a no-op when it is no longer queued)."""
    return Executor(process_context()).run(uuid.UUID(job_id))


def run_rq_worker(ctx: Context, burst: bool = False) -> None:
    """``bitalloc worker``: take jobs from the RQ queue (one work horse per job), reaping lost jobs meanwhile."""
    from rq import Worker

    from bitalloc.service.queue import RQQueue

    if not isinstance(ctx.queue, RQQueue):
        raise ValueError("bitalloc worker needs BITALLOC_REDIS_URL (without it, `bitalloc serve` runs jobs itself)")
    reaper = Reaper(ctx)
    reaper.start()
    try:
        Worker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=burst, logging_level="INFO")
    finally:
        reaper.stop()
