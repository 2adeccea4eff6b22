"""The database: tokens, jobs and their log, profiles, fronts, points, allocations, artifacts, builds.

Ownership runs through ``token_id``: a job, its front and its artifacts belong to the token
that submitted the job, and every query filters by it. Profiles are shared: they are a cache
keyed by everything that determines their numbers, and their bytes live in the
content-addressed store (``sha256``).

Every table's class ends in ``Record`` (``JobRecord``, ``ProfileRecord``, ...), so a row is never
mistaken for the domain object of the same name (``quant.Profile``, ``search.Front``,
``search.Allocation``) that it stores.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED_STATES = ("succeeded", "failed", "canceled")
# A job compresses (profile, front), builds a point's packed artifact (with a ``Build`` row), or
# measures one block range of a compress job's streamed profile (with a ``Shard`` row).
JOB_KINDS = ("compress", "artifact", "shard")
# At most one build per point, method and target is live (queued, running or succeeded); a failed or
# canceled one may be followed by another. Builds' ``request_hash`` hashes (point, method, target).
LIVE_BUILD_STATES = ("queued", "running", "succeeded")
LIVE_BUILD = f"kind = 'artifact' AND state IN {LIVE_BUILD_STATES}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out, on PostgreSQL (timestamptz) and SQLite (naive text) alike,
    so lease arithmetic and comparisons mean the same on both."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s", "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class TokenRecord(Base):
    """An API token; only its sha256 is stored (tokens are random, so a plain hash suffices)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class JobRecord(Base):
    """One submission and its lifecycle.

    ``kind`` says what it runs: ``compress`` (the pipeline; ``spec`` is the request) or
    ``artifact`` (a point's packed artifact; ``spec`` holds the method, ``Build`` the point).
    A compress job's ``run_spec`` is the pipeline's spec (``JobSpec.to_dict``) as the API accepted
    it: the worker runs that, never the request revalidated by a schema that may since have
    changed. NULL for builds, and for a job whose request migration 0005 could not convert.
    ``lease_owner``/``lease_expires_at`` fence the worker running it: every write a worker
    makes is conditioned on still owning the lease, so a job whose worker was presumed dead
    and retried elsewhere cannot be written twice. ``deadline_at`` bounds its run time.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("token_id", "idempotency_key", name="uq_jobs_token_idempotency"),
        CheckConstraint(f"state IN {JOB_STATES}", name="state"),
        Index("ix_jobs_state_created", "state", "created_at"),
        Index("ix_jobs_token_created", "token_id", "created_at"),
        Index("ix_jobs_live_build", "request_hash", unique=True, sqlite_where=text(LIVE_BUILD),
              postgresql_where=text(LIVE_BUILD)),
    )
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16), CheckConstraint(f"kind IN {JOB_KINDS}", name="kind"),
                                      default="compress", server_default="compress")
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict[str, Any]]
    run_spec: Mapped[dict[str, Any] | None]
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int]
    timeout_seconds: Mapped[float] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    seconds: Mapped[float | None] = mapped_column(Float)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id"))

    # Deleting a job deletes its log, front (points), allocations and artifact records: ON DELETE CASCADE.
    front: Mapped[FrontRecord | None] = relationship(passive_deletes=True)


class JobLogRecord(Base):
    """What happened to a job, line by line (phases, retries, the reason it failed)."""

    __tablename__ = "job_logs"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)


class ProfileRecord(Base):
    """A stored profile: its cache key, what made it, and the sha256 of its ``.npz``."""

    __tablename__ = "profiles"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(Text)
    metric: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(16))
    units: Mapped[int]
    formats: Mapped[list[Any]]
    meta: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FrontRecord(Base):
    """A job's front: written in the same transaction as its points and the job's success."""

    __tablename__ = "fronts"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id"))
    axes: Mapped[list[Any]]
    solver: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    points: Mapped[list[PointRecord]] = relationship(back_populates="front", cascade="all, delete-orphan",
                                               passive_deletes=True, order_by="PointRecord.rank")


class AllocationRecord(Base):
    """Unit -> format, with the totals computed by ``search`` for the job's profile."""

    __tablename__ = "allocations"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    formats: Mapped[dict[str, Any]]
    bytes: Mapped[int] = mapped_column(BigInteger)
    avg_bits: Mapped[float] = mapped_column(Float)
    error: Mapped[float] = mapped_column(Float)
    latency: Mapped[float | None] = mapped_column(Float)
    measured: Mapped[float | None] = mapped_column(Float)
    solver: Mapped[str] = mapped_column(String(32))
    info: Mapped[dict[str, Any]]


class PointRecord(Base):
    """A point a job offers: on the front (``on_front``), and/or the one chosen at its budget."""

    __tablename__ = "points"
    id: Mapped[int] = mapped_column(primary_key=True)
    front_id: Mapped[int] = mapped_column(ForeignKey("fronts.id", ondelete="CASCADE"), index=True)
    allocation_id: Mapped[int] = mapped_column(ForeignKey("allocations.id", ondelete="CASCADE"))
    rank: Mapped[int]
    on_front: Mapped[bool] = mapped_column(Boolean)
    chosen: Mapped[bool] = mapped_column(Boolean)

    front: Mapped[FrontRecord] = relationship(back_populates="points")
    allocation: Mapped[AllocationRecord] = relationship(lazy="joined")


class ArtifactRecord(Base):
    """A downloadable file owned by a token (through its job); its bytes are in the store by sha256,
    shared by every row with those bytes and removed once no artifact or profile row names them
    (``service.garbage``)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind", "sha256", name="uq_artifacts_job_kind_sha256"),)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"), index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BuildRecord(Base):
    """A point's build for one target (``quant.targets``), run by its own job (kind ``artifact``).

    The job carries the lifecycle (queue, lease, retries, progress, log); this row says what
    it builds. ``parent_id`` is the succeeded job whose point it is; on success ``artifact_id``
    names the tar, an ``ArtifactRecord`` of that parent job (so it is listed, owned and deleted with it).
    """

    __tablename__ = "builds"
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    point_id: Mapped[int] = mapped_column(ForeignKey("points.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(32), server_default="bitalloc")
    artifact_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"))

    job: Mapped[JobRecord] = relationship(foreign_keys=[job_id], lazy="joined")
    artifact: Mapped[ArtifactRecord | None] = relationship(lazy="joined")


class ShardRecord(Base):
    """One block range of a compress job's streamed profile (``quant.shards``), run by its own job
    (kind ``shard``) so that any worker can take it and a lost one is retried like any job.

    ``parent_id`` is the compress job, which plans the shards, waits for them (running what no
    other worker took) and merges their rows. ``inputs_sha256`` names the shard's inputs in the
    blob store (the metric's shared quantities and the hidden states entering its first block);
    a parent retried with the same inputs reuses the shards already measured, and shards of
    other inputs are never merged with them. ``rows_sha256`` names the measured rows once the
    shard succeeded.
    """

    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("parent_id", "inputs_sha256", "index", name="uq_shards_parent_inputs_index"),)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int]
    first_block: Mapped[int]
    stop_block: Mapped[int]
    inputs_sha256: Mapped[str] = mapped_column(String(64))
    rows_sha256: Mapped[str | None] = mapped_column(String(64))

    job: Mapped[JobRecord] = relationship(foreign_keys=[job_id], lazy="joined")
