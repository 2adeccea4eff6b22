"""A point's quantized model, built in the background and kept as one downloadable file.

A build is a job of kind ``artifact`` plus a ``Build`` row naming the point, the method and
the target (``quant.targets``: bitalloc's packed artifact, a GGUF, a compressed-tensors
checkpoint), so it runs on the same workers under the same leases, retries and timeouts as a
compression job. The worker writes the target's folder, packs it into one uncompressed tar
with fixed metadata, so the same build gives the same bytes, and stores the tar by sha256 as
a ``model`` artifact of the point's job, owned by the job's token.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitalloc.pipeline.inputs import check_inputs
from bitalloc.pipeline.spec import JobSpec
from bitalloc.quant.calibration import calibration_for
from bitalloc.quant.device import resolve_device
from bitalloc.quant.loading import LoadPolicy, model_dtype
from bitalloc.quant.progress import ProgressFn
from bitalloc.quant.quantizers import Method
from bitalloc.quant.stream import load_within
from bitalloc.quant.targets import BuildRequest, build_target
from bitalloc.service import jobs
from bitalloc.service.models import LIVE_BUILD_STATES, ArtifactRecord, BuildRecord, JobRecord, PointRecord
from bitalloc.service.settings import Settings
from bitalloc.service.storage import BlobStore

TAR = "application/x-tar"


def request_hash(point_id: int, method: str, target: str) -> str:
    """What makes two build requests the same one (a point's id is global, so its token is implied)."""
    request = {"point_id": point_id, "method": method, "target": target}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def submit(
    session: Session, parent: JobRecord, point_id: int, method: Method, target: str, settings: Settings
) -> tuple[BuildRecord, bool]:
    """The live (queued, running or succeeded) build of this point, method and target, or a new queued one.

    Returns ``(build, created)``. A failed or canceled build is not live, so asking again
    builds afresh. Two concurrent requests both try to insert; the partial unique index on
    live builds lets one win and the other returns the winner's build.
    """
    digest = request_hash(point_id, method, target)
    live = _live(session, digest)
    if live is not None:
        return live, False
    job = JobRecord(
        token_id=parent.token_id,
        kind="artifact",
        request_hash=digest,
        state="queued",
        spec={"method": method, "target": target},
        progress={},
        max_attempts=settings.max_attempts,
        timeout_seconds=settings.job_timeout,
    )
    build = BuildRecord(job=job, parent_id=parent.id, point_id=point_id, method=method, target=target)
    try:
        with session.begin_nested():
            session.add(build)
    except IntegrityError:
        live = _live(session, digest)
        if live is None:
            raise
        return live, False
    jobs.add_log(session, job.id, f"queued: the {target} build ({method}) of point {point_id} of job {parent.id}")
    return build, True


def _live(session: Session, digest: str) -> BuildRecord | None:
    return session.scalar(
        select(BuildRecord)
        .join(BuildRecord.job)
        .where(JobRecord.request_hash == digest, JobRecord.kind == "artifact", JobRecord.state.in_(LIVE_BUILD_STATES))
    )


def get_build(session: Session, token_id: int, build_id: uuid.UUID) -> BuildRecord | None:
    """The token's build (with its job and artifact), or None, as for another token's."""
    return session.scalar(
        select(BuildRecord).join(BuildRecord.job).where(BuildRecord.job_id == build_id, JobRecord.token_id == token_id)
    )


@dataclass(frozen=True)
class BuildInputs:
    """What a worker needs to build: the parent job's spec as it ran (model, calibration), the point's formats."""

    spec: JobSpec
    formats: dict[str, str]
    method: Method
    target: str
    name: str


def inputs(session: Session, job_id: uuid.UUID) -> BuildInputs:
    """Read once, before the (long) build, so no transaction stays open while it runs."""
    build = session.get_one(BuildRecord, job_id)
    parent = session.get_one(JobRecord, build.parent_id)
    point = session.get_one(PointRecord, build.point_id)
    name = f"bitalloc-{parent.id.hex[:8]}-point{point.id}-{build.method}-{build.target}"
    return BuildInputs(
        jobs.job_spec(parent),
        dict(point.allocation.formats),
        cast(Method, build.method),
        build.target,
        name,
    )


@dataclass(frozen=True)
class Packed:
    """A build's tar, already in the store, and what its target says it holds."""

    name: str
    sha256: str
    size: int
    manifest: dict


def run(build: BuildInputs, storage: BlobStore, workdir: Path, policy: LoadPolicy, progress: ProgressFn) -> Packed:
    """Build the target, pack and store it. GPTQ fits on the parent job's own calibration set. The
    model is streamed block by block when the job's was (``max_memory``, ``stream``)."""
    check_inputs(build.spec, policy)
    progress(0, 1, "load")
    device = resolve_device(build.spec.device)
    model = load_within(build.spec.model, policy, dtype=model_dtype(build.spec.dtype, device), device=device,
                        max_memory=build.spec.max_memory, stream=build.spec.stream)
    calibration = None
    if build.method == "gptq":
        spec = build.spec
        calibration = calibration_for(model, spec.calibration, seq_len=spec.seq_len, count=spec.samples, seed=spec.seed,
                                      bos=spec.bos)
    progress(1, 1, "load")
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".build-") as tmp:
        folder = Path(tmp) / build.name
        built = build_target(build.target, BuildRequest(model, build.formats, folder, method=build.method,
                                                        calibration=calibration, progress=progress))
        progress(0, 1, "pack")
        tar = Path(tmp) / f"{build.name}.tar"
        pack(folder, tar)
        sha256, size = storage.put_file(tar)
        progress(1, 1, "pack")
    return Packed(tar.name, sha256, size, built.summary)


def pack(folder: Path, out: Path) -> None:
    """Tar ``folder`` under its own name, in name order, with no times, owners or modes of this
    machine: the same files give the same bytes (and so the same sha256) on any worker."""

    def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(folder, arcname=folder.name, recursive=False, filter=fixed)
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=f"{folder.name}/{path.relative_to(folder).as_posix()}", recursive=False, filter=fixed)


def store(session: Session, job_id: uuid.UUID, packed: Packed) -> ArtifactRecord:
    """Record the tar as a ``model`` artifact of the point's job and link it to the build
    (inside the transaction that marks the build succeeded)."""
    build = session.get_one(BuildRecord, job_id)
    parent = session.get_one(JobRecord, build.parent_id)
    artifact = ArtifactRecord(
        token_id=parent.token_id,
        job_id=parent.id,
        kind="model",
        name=packed.name,
        media_type=TAR,
        sha256=packed.sha256,
        size=packed.size,
        meta={"build_id": str(job_id), "point_id": build.point_id, "method": build.method, "target": build.target,
              **packed.manifest},
    )
    session.add(artifact)
    session.flush()
    build.artifact_id = artifact.id
    return artifact
