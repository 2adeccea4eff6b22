"""Run claimed jobs and record what happens: a ``compress`` job through
``pipeline.run_job``, an ``artifact`` job (a point's packed artifact) through
``service.builds.run``, a ``shard`` job (a block range of a compress job's streamed profile)
through ``pipeline.measure_shard``, or on its parent's own context when the parent runs it
(``service.shards``).

Results are written in the same transaction as the job's success, and only while this
attempt still owns the lease; a job's own failure (bad input, infeasible budget) fails it
with the message, anything else with the exception's name (its traceback goes to the log).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session

from bitalloc.pipeline.run import measure_shard, run_job
from bitalloc.quant.shards import Measure, Shard, encode_rows
from bitalloc.search import SearchError
from bitalloc.service import builds, jobs, results
from bitalloc.service.attempt import Attempt, Stop
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import JobRecord, ShardRecord
from bitalloc.service.shards import ShardFailed, WorkerShards

log = logging.getLogger("bitalloc.worker")

# Failures that are the job's own (bad input, unknown model, infeasible budget, a solver
# that gave up): the job fails with the message, and a retry would fail the same way.
JOB_ERRORS = (ValueError, FileNotFoundError, SearchError, ShardFailed)


REASON_CHARS = 500


def public_reason(message: str) -> str:
    """A failure's reason as the API shows it: its first line, at most ``REASON_CHARS`` long, so a
    library's exception can never carry a file's contents or a directory listing to the caller
    (the whole exception goes to the server's log)."""
    lines = message.strip().splitlines() or ["unknown error"]
    first = lines[0]
    cut = len(first) > REASON_CHARS or len(lines) > 1
    return first[:REASON_CHARS] + (" [...]" if cut else "")


@dataclass(frozen=True)
class Outcome:
    """What a run's results left in the database: the job's ``result`` and the log line."""

    result: dict
    message: str
    profile_id: int | None = None


ResultWriter = Callable[[Session], Outcome]
"""A finished run's results, written inside the transaction of the job's success."""


class Executor:
    """Claims and runs jobs for one worker (a thread or an RQ work horse); ``measure``, when given,
    measures shard jobs on a context this process already holds (their parent's)."""

    def __init__(self, ctx: Context, stopping: threading.Event | None = None, measure: Measure | None = None) -> None:
        self.ctx = ctx
        self.stopping = stopping or threading.Event()
        self.measure = measure
        self.name = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"

    def run(self, job_id: uuid.UUID) -> str | None:
        """Run one queued job; returns its final state, or None when it was not ours to run."""
        return self._start(lambda session, owner: jobs.claim(session, job_id, owner, self.ctx.settings.lease_seconds))

    def run_next(self) -> str | None:
        """Claim and run the oldest queued job (embedded mode); None when there is none."""
        return self._start(lambda session, owner: jobs.claim_next(session, owner, self.ctx.settings.lease_seconds))

    def _start(self, claim: Callable[[Session, str], JobRecord | None]) -> str | None:
        owner = uuid.uuid4().hex
        with transaction(self.ctx.sessions) as session:
            job = claim(session, owner)
            if job is None:
                return None
            jobs.add_log(session, job.id, f"attempt {job.attempts} of {job.max_attempts} on {self.name}")
        attempt = Attempt(self.ctx, job.id, owner, job.timeout_seconds, self.stopping)
        work = {"compress": self._compress, "artifact": self._build, "shard": self._shard}[job.kind]
        try:
            with attempt.heartbeat():
                store = work(job, attempt)
                attempt.check()  # a cancel or timeout noticed after the last progress report
        except Stop as stop:
            return self._stopped(attempt, stop)
        except JOB_ERRORS as exc:
            log.info("job %s failed: %s", job.id, exc)
            return self._fail(attempt, str(exc))
        except Exception as exc:  # a bug or the machine (out of memory, ...): the traceback goes to the server log
            log.exception("job %s failed", job.id)
            return self._fail(attempt, f"internal error: {type(exc).__name__}: {exc}")
        return self._succeed(attempt, store)

    def _compress(self, job: JobRecord, attempt: Attempt) -> ResultWriter:
        """Run the pipeline on the spec stored when the job was accepted; its front, points and
        profile are stored with the job's success."""
        settings = self.ctx.settings
        shards = WorkerShards(self.ctx, job.id, attempt.progress,
                              lambda shard_id, measure: Executor(self.ctx, self.stopping, measure).run(shard_id))
        result = run_job(jobs.job_spec(job), profile_dir=settings.profile_dir,
                         policy=settings.load_policy(), progress=attempt.progress,
                         notify=lambda message: attempt.log(message, "warning"), runner=shards)
        compute = result.compute
        attempt.log(f"computed on {compute['device']} in {compute['dtype']}"
                    f"{', the model streamed block by block' if compute['streamed'] else ''}")
        profile_path = settings.profile_dir / f"{result.profile.meta['key']}.npz"

        def store(session: Session) -> Outcome:
            profile = results.store_profile(session, self.ctx.storage, profile_path, result)
            record = session.get_one(JobRecord, job.id)
            summary = results.store(session, record, result, profile)
            results.store_measured(session, self.ctx.storage, record, result)
            return Outcome(summary, f"succeeded: {len(result.front)} front points stored", profile.id)

        return store

    def _build(self, job: JobRecord, attempt: Attempt) -> ResultWriter:
        """Build and store the point's artifact tar; its ``ArtifactRecord`` is written with the success."""
        with self.ctx.sessions() as session:
            inputs = builds.inputs(session, job.id)
        packed = builds.run(inputs, self.ctx.storage, self.ctx.settings.data_dir / "builds",
                            self.ctx.settings.load_policy(), attempt.progress)

        def store(session: Session) -> Outcome:
            artifact = builds.store(session, job.id, packed)
            return Outcome({"artifact_id": str(artifact.id), "sha256": artifact.sha256, "size": artifact.size},
                          f"succeeded: artifact {artifact.name} ({artifact.size} bytes, sha256 {artifact.sha256})")

        return store

    def _shard(self, job: JobRecord, attempt: Attempt) -> ResultWriter:
        """Measure one shard, on the parent's context when the parent runs it, else on a context
        built from the parent's spec; its rows go to the blob store and are named on success."""
        with self.ctx.sessions() as session:
            record = session.get_one(ShardRecord, job.id)
            spec = jobs.job_spec(session.get_one(JobRecord, record.parent_id))
        shard = Shard(record.index, range(record.first_block, record.stop_block))
        if self.measure is not None:
            part = self.measure(shard)
        else:
            inputs = self.ctx.storage.path(record.inputs_sha256).read_bytes()
            part = measure_shard(spec, shard, inputs, policy=self.ctx.settings.load_policy(), progress=attempt.progress)
        digest = self.ctx.storage.put_bytes(encode_rows(part))

        def store(session: Session) -> Outcome:
            session.execute(update(ShardRecord).where(ShardRecord.job_id == job.id).values(rows_sha256=digest))
            return Outcome({"rows_sha256": digest, "units": len(part.rows)},
                           f"succeeded: the rows of {len(part.rows)} units (blocks {shard.blocks.start}-"
                           f"{shard.blocks.stop - 1})")

        return store

    def _succeed(self, attempt: Attempt, store: ResultWriter) -> str | None:
        attempt.tracker.finish()
        try:
            with transaction(self.ctx.sessions) as session:
                outcome = store(session)
                if not jobs.finish(session, attempt.job_id, attempt.owner, "succeeded", progress=attempt.tracker.snapshot(),
                                   result=outcome.result, profile_id=outcome.profile_id):
                    raise _NotOurs()
                jobs.add_log(session, attempt.job_id, outcome.message)
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
        reason = public_reason(reason)
        with transaction(self.ctx.sessions) as session:
            if not jobs.finish(session, attempt.job_id, attempt.owner, "failed", error=reason,
                               progress=attempt.tracker.snapshot()):
                return None
            jobs.add_log(session, attempt.job_id, f"failed: {reason}", "error")
        return "failed"


class _NotOurs(Exception):
    """The success write found the job no longer ours to finish."""
