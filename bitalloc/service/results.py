"""A finished job's results in the database, and the configuration a user downloads.

``store`` runs inside the transaction that marks the job succeeded: the front, its points,
their allocations and the profile's artifact record are written all together or not at all.
The profile's bytes go to the content-addressed store first; if the transaction then fails,
what remains is an unreferenced blob (``bitalloc gc`` removes it), never a half-written front.
"""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitalloc.pipeline.run import JobResult
from bitalloc.quant.export import Export, export_from_profile
from bitalloc.quant.profile import Profile
from bitalloc.search import Allocation, Front
from bitalloc.service import models
from bitalloc.service.storage import BlobStore

NPZ = "application/octet-stream"


def store_profile(session: Session, storage: BlobStore, profile_path: Path, result: JobResult) -> models.ProfileRecord:
    """The profile's row, created on first sight of its cache key (its bytes stored by sha256)."""
    meta = result.profile.meta
    row = session.scalar(select(models.ProfileRecord).where(models.ProfileRecord.key == meta["key"]))
    if row is not None:
        if not storage.exists(row.sha256):  # the store lost these bytes (or is not shared): heal it with ours
            row.sha256, row.size = storage.put_file(profile_path)
        return row
    sha256, size = storage.put_file(profile_path)
    row = models.ProfileRecord(key=meta["key"], sha256=sha256, size=size, model=meta["model"], metric=meta["metric"],
                         method=meta["method"], units=len(result.profile.units), formats=list(result.profile.formats),
                         meta=meta)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another worker stored the same profile first: use theirs
        existing = session.scalar(select(models.ProfileRecord).where(models.ProfileRecord.key == meta["key"]))
        if existing is None:
            raise
        return existing
    return row


def store(session: Session, job: models.JobRecord, result: JobResult, profile: models.ProfileRecord) -> dict:
    """Write the front, its points and allocations and the profile artifact; returns the
    job's ``result`` summary (with the chosen point's id)."""
    solver = result.front[0].solver if len(result.front) else job.run_spec["solver"]  # the sweep's, not the budget's (it ran from run_spec)
    front = models.FrontRecord(job_id=job.id, profile_id=profile.id, axes=list(result.front.axes), solver=solver)
    session.add(front)
    chosen_key = None if result.chosen is None else result.chosen.choice
    ranked = _with_chosen(result.front, result.chosen)
    chosen_point = None
    for rank, (allocation, on_front) in enumerate(ranked):
        point = models.PointRecord(
            front=front,
            allocation=allocation_row(job.id, allocation),
            rank=rank,
            on_front=on_front,
            chosen=allocation.choice == chosen_key,
        )
        session.add(point)
        if point.chosen:
            chosen_point = point
    session.add(
        models.ArtifactRecord(
            token_id=job.token_id,
            job_id=job.id,
            kind="profile",
            name=f"profile-{profile.key[:12]}.npz",
            media_type=NPZ,
            sha256=profile.sha256,
            size=profile.size,
            meta={"key": profile.key},
        )
    )
    session.flush()
    return {
        "profile_cached": result.profile_cached,
        "seconds": result.seconds,
        "evaluation": result.evaluation,
        "chosen_point_id": None if chosen_point is None else chosen_point.id,
        "profile_key": profile.key,
    }


def store_measured(session: Session, storage: BlobStore, job: models.JobRecord, result: JobResult) -> None:
    """The surrogate's measured allocations (``pipeline.measured``: per-unit choices of the
    profile's units and formats, and each one's KL per fitness window) as the job's artifact of
    kind ``surrogate``, when the job ran one. Its fitted model and diagnostics are the chosen
    allocation's ``info``."""
    if result.measured is None:
        return
    sha256, size = storage.put_file(result.measured)
    with np.load(result.measured, allow_pickle=False) as data:
        configurations, windows = data["values"].shape
    key = result.profile.meta["key"]
    session.add(models.ArtifactRecord(token_id=job.token_id, job_id=job.id, kind="surrogate",
                                      name=f"surrogate-{key[:12]}.npz", media_type=NPZ, sha256=sha256, size=size,
                                      meta={"profile_key": key, "configurations": configurations, "windows": windows}))


def _with_chosen(front: Front, chosen: Allocation | None) -> list[tuple[Allocation, bool]]:
    """The front's points by size, with the budget's point added where the sweep missed it."""
    ranked = [(a, True) for a in front]
    if chosen is not None and all(a.choice != chosen.choice for a in front):
        on_front = not any(_dominates(a, chosen) for a in front)
        ranked.append((chosen, on_front))
        ranked.sort(key=lambda item: (item[0].bytes, item[0].error))
    return ranked


def _dominates(a: Allocation, b: Allocation) -> bool:
    return a.bytes <= b.bytes and a.error <= b.error and (a.bytes < b.bytes or a.error < b.error)


def allocation_row(job_id: uuid.UUID, allocation: Allocation) -> models.AllocationRecord:
    return models.AllocationRecord(
        job_id=job_id,
        formats=allocation.formats,
        bytes=int(allocation.bytes),
        avg_bits=float(allocation.avg_bits),
        error=float(allocation.error),
        latency=None if allocation.latency is None else float(allocation.latency),
        measured=allocation.measured,
        solver=allocation.solver,
        info=_jsonable(allocation.info),
    )


def _jsonable(info: object) -> dict:
    """Solver info as JSON (numpy scalars and tuples become plain values)."""
    return json.loads(json.dumps(dict(info), default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def provenance(job: models.JobRecord, point: models.PointRecord, profile: models.ProfileRecord) -> dict:
    """Where a point's allocation came from, for the exports that carry it (all of it: the JSON file)."""
    allocation = point.allocation
    return {
        "job_id": str(job.id),
        "point_id": point.id,
        "model": job.spec["model"],
        "profile": {
            "key": profile.key,
            "sha256": profile.sha256,
            "metric": profile.metric,
            "method": profile.method,
            "calibration": profile.meta.get("calibration"),
            "latency_source": profile.meta.get("latency_source"),
        },
        "budgets": job.spec["budgets"],
        "chosen_at_budget": point.chosen,
        "solver": allocation.solver,
        "totals": {"error": allocation.error, "latency": allocation.latency, "measured_kl": allocation.measured},
    }


@functools.lru_cache(maxsize=8)
def stored_profile(path: Path) -> Profile:
    """A profile from the blob store, parsed once per process (its path is its sha256: it never changes)."""
    return Profile.load(path)


def config_artifact(
    session: Session,
    storage: BlobStore,
    job: models.JobRecord,
    point: models.PointRecord,
    profile: models.ProfileRecord,
    export: str = "json",
) -> tuple[models.ArtifactRecord, Export]:
    """The point's configuration in ``export``'s format, kept as an artifact of the job (once per content).

    Raises ``quant.export.ExportError`` when that format cannot express the allocation.
    """
    exported = export_from_profile(
        export, stored_profile(storage.path(profile.sha256)), point.allocation.formats, provenance(job, point, profile)
    )
    sha256 = storage.put_bytes(exported.data)
    stem, dot, suffix = exported.filename.rpartition(".")
    name = f"{stem}-{job.id.hex[:8]}-{point.id}{dot}{suffix}"
    artifact = session.scalar(
        select(models.ArtifactRecord).where(
            models.ArtifactRecord.job_id == job.id,
            models.ArtifactRecord.kind == "config",
            models.ArtifactRecord.sha256 == sha256,
        )
    )
    if artifact is None:
        artifact = models.ArtifactRecord(
            token_id=job.token_id,
            job_id=job.id,
            kind="config",
            name=name,
            media_type=exported.media_type,
            sha256=sha256,
            size=len(exported.data),
            meta={"point_id": point.id, "format": export},
        )
        try:
            with session.begin_nested():
                session.add(artifact)
        except IntegrityError:  # the same download raced us; the stored one is identical
            artifact = session.scalar(
                select(models.ArtifactRecord).where(
                    models.ArtifactRecord.job_id == job.id,
                    models.ArtifactRecord.kind == "config",
                    models.ArtifactRecord.sha256 == sha256,
                )
            )
    return artifact, exported
