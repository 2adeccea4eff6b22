"""A compress job's streamed profile, measured in block-range shards that any worker may take.

The compress job's attempt is the profile's ``ShardRunner`` (``quant.shards``). It stores each
shard's inputs (the metric's shared quantities and the hidden states entering the shard) in
the blob store and makes one job of kind ``shard`` per block range (a ``ShardRecord`` says
which), puts each on the queue, and then works through them
itself: it claims a queued shard like any worker and measures it on the context it already
holds (after its first, only shards no other worker took within ``HAND_OFF_SECONDS``), and
when none is left to claim it waits for the ones other workers run. A shard whose
worker dies is retried by the reaper like any job (or claimed by the parent once it is queued
again); a shard that fails for good fails the parent. The rows come back through the blob
store, and ``quant.shards.merge`` refuses a missing or repeated shard.

A parent that is retried finds the shards of its earlier attempt by their inputs' bytes: those
that succeeded are reused, failed ones run again. When the parent stops (canceled, failed,
timed out, its worker shutting down) the shards it left are canceled.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bitalloc.quant.progress import ProgressFn
from bitalloc.quant.shards import Inputs, Measure, Shard, ShardRows, decode_rows
from bitalloc.service import jobs
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import FINISHED_STATES, JobRecord, ShardRecord, utcnow

POLL_SECONDS = 0.5
HAND_OFF_SECONDS = 3.0
"""How long a queued shard is left to other workers before the parent measures it too: the parent
takes its first shard at once (the last of the plan, as the queue hands out the first ones), and
the rest only once no other worker has taken them for this long."""


class ShardFailed(Exception):
    """A shard failed for good (its attempts spent, or its own error), so its parent fails."""


RunHere = Callable[[uuid.UUID, Measure], "str | None"]
"""Claim and run one shard job in this process with ``measure`` (``None`` when it was not queued)."""


def request_hash(parent_id: uuid.UUID, inputs_sha256: str, index: int) -> str:
    request = {"parent": str(parent_id), "inputs": inputs_sha256, "index": index}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def plan_jobs(session: Session, parent: JobRecord, layout: list[Shard], inputs: list[str]) -> list[ShardRecord]:
    """The shard rows of ``layout`` whose inputs are the blobs ``inputs`` (one per shard): found (a
    failed or canceled one queued again) or made anew; the parent's other live shards are canceled."""
    found = {(r.index, r.inputs_sha256): r for r in session.scalars(select(ShardRecord).where(
        ShardRecord.parent_id == parent.id))}
    records = []
    for shard, digest in zip(layout, inputs, strict=True):
        record = found.pop((shard.index, digest), None)
        if record is None:
            job = JobRecord(token_id=parent.token_id, kind="shard", state="queued", progress={},
                            request_hash=request_hash(parent.id, digest, shard.index),
                            spec={"parent": str(parent.id), "shard": shard.index,
                                  "blocks": [shard.blocks.start, shard.blocks.stop]},
                            max_attempts=parent.max_attempts, timeout_seconds=parent.timeout_seconds)
            record = ShardRecord(job=job, parent_id=parent.id, index=shard.index, first_block=shard.blocks.start,
                                 stop_block=shard.blocks.stop, inputs_sha256=digest)
            session.add(record)
            session.flush()
            jobs.add_log(session, job.id, f"queued: shard {shard.index + 1} of {len(layout)} (blocks "
                                          f"{shard.blocks.start}-{shard.blocks.stop - 1}) of job {parent.id}")
        elif (record.first_block, record.stop_block) != (shard.blocks.start, shard.blocks.stop):
            raise ValueError(f"shard {shard.index} of job {parent.id} was planned over other blocks before")
        elif record.job.state in ("failed", "canceled"):
            session.execute(update(JobRecord).where(JobRecord.id == record.job_id).values(
                state="queued", attempts=0, error=None, cancel_requested=False, finished_at=None))
            jobs.add_log(session, record.job_id, "queued again: its parent job runs again")
        records.append(record)
    cancel(session, [r.job_id for r in found.values()])
    return records


def cancel(session: Session, shard_jobs) -> None:
    """Cancel the unfinished jobs among ``shard_jobs`` (ids, or a select of them)."""
    for job in session.scalars(select(JobRecord).where(JobRecord.id.in_(shard_jobs),
                                                       JobRecord.state.not_in(FINISHED_STATES))):
        jobs.cancel(session, job)


@dataclass(frozen=True)
class ShardState:
    """What the API shows of one shard."""

    index: int
    blocks: tuple[int, int]
    state: str
    attempts: int
    percent: float
    error: str | None


def states(session: Session, parent_id: uuid.UUID) -> list[ShardState]:
    """The shards of the parent's latest plan (the most recently made row of each index), in order."""
    latest: dict[int, ShardRecord] = {}
    for record in session.scalars(select(ShardRecord).join(ShardRecord.job).where(ShardRecord.parent_id == parent_id)
                                  .order_by(JobRecord.created_at)):
        latest[record.index] = record
    return [ShardState(r.index, (r.first_block, r.stop_block), r.job.state, r.job.attempts,
                       float((r.job.progress or {}).get("percent", 100.0 if r.job.state == "succeeded" else 0.0)),
                       r.job.error) for _, r in sorted(latest.items())]


class WorkerShards:
    """The ``ShardRunner`` of one attempt of a compress job (``parent_id``) on the service."""

    def __init__(self, ctx: Context, parent_id: uuid.UUID, progress: ProgressFn, run_here: RunHere) -> None:
        self.ctx, self.parent_id, self.progress, self.run_here = ctx, parent_id, progress, run_here
        self.ran = 0  # shards measured here

    def __call__(self, layout: list[Shard], inputs: Inputs, measure: Measure) -> list[ShardRows]:
        digests = [self.ctx.storage.put_bytes(inputs(shard)) for shard in layout]
        with transaction(self.ctx.sessions) as session:
            parent = session.get_one(JobRecord, self.parent_id)
            sent = [(r.job_id, r.job.attempts + 1) for r in plan_jobs(session, parent, layout, digests)]
            jobs.add_log(session, parent.id, f"profile split into {len(layout)} shards of "
                                             f"{', '.join(str(len(s.blocks)) for s in layout)} blocks")
        ids = [job_id for job_id, _ in sent]
        try:
            for job_id, attempt in sent:
                self.ctx.queue.enqueue(job_id, attempt)
            rows = self._wait(ids, measure)
        except BaseException:
            with transaction(self.ctx.sessions) as session:
                cancel(session, ids)
            raise
        return [decode_rows(self.ctx.storage.path(sha).read_bytes()) for sha in rows]

    def _wait(self, ids: list[uuid.UUID], measure: Measure) -> list[str]:
        """Run queued shards here and wait for the others; the rows' blobs once all succeeded."""
        while True:
            with self.ctx.sessions() as session:
                found = {r.job_id: r for r in session.scalars(select(ShardRecord).where(ShardRecord.job_id.in_(ids)))}
                shards = [(found[job_id], found[job_id].job) for job_id in ids]
            done = sum(job.state == "succeeded" for _, job in shards)
            self.progress(done, len(ids), "shards")  # outside the session: it writes (and may stop the parent)
            for record, job in shards:
                if job.state in ("failed", "canceled"):
                    raise ShardFailed(f"shard {record.index + 1} of {len(ids)} (blocks {record.first_block}-"
                                      f"{record.stop_block - 1}) {job.state}: {job.error}")
            if done == len(ids):
                return [record.rows_sha256 for record, _ in shards]  # type: ignore[misc]
            now = utcnow()
            queued = [(record.job_id, (now - job.created_at).total_seconds()) for record, job in shards
                      if job.state == "queued"]
            mine = [job_id for job_id, waited in queued if not self.ran or waited >= HAND_OFF_SECONDS]
            if mine and self.run_here(mine[-1], measure) is not None:
                self.ran += 1
            else:
                time.sleep(POLL_SECONDS)
