"""Initial schema: tokens, jobs and their log, profiles, fronts, allocations, points, artifacts.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JOB_STATES = "('queued', 'running', 'succeeded', 'failed', 'canceled')"


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(column: str, table: str, source: str, cascade: bool = False) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{table}.id"], name=f"fk_{source}_{column}_{table}",
                                   ondelete="CASCADE" if cascade else None)


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        _time("created_at"), _time("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_tokens_token_hash"),
    )
    op.create_table(
        "profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("units", sa.Integer(), nullable=False),
        sa.Column("formats", sa.JSON(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_profiles"),
        sa.UniqueConstraint("key", name="uq_profiles_key"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Float(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _time("lease_expires_at", nullable=True), _time("deadline_at", nullable=True),
        _time("created_at"), _time("started_at", nullable=True), _time("finished_at", nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.CheckConstraint(f"state IN {JOB_STATES}", name="ck_jobs_state"),
        _fk("profile_id", "profiles", "jobs"), _fk("token_id", "tokens", "jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("token_id", "idempotency_key", name="uq_jobs_token_idempotency"),
    )
    op.create_index("ix_jobs_state_created", "jobs", ["state", "created_at"])
    op.create_index("ix_jobs_token_created", "jobs", ["token_id", "created_at"])
    op.create_table(
        "job_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        _time("at"),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _fk("job_id", "jobs", "job_logs", cascade=True),
        sa.PrimaryKeyConstraint("id", name="pk_job_logs"),
    )
    op.create_index("ix_job_logs_job_id", "job_logs", ["job_id"])
    op.create_table(
        "allocations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("formats", sa.JSON(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("avg_bits", sa.Float(), nullable=False),
        sa.Column("error", sa.Float(), nullable=False),
        sa.Column("latency", sa.Float(), nullable=True),
        sa.Column("measured", sa.Float(), nullable=True),
        sa.Column("solver", sa.String(32), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        _fk("job_id", "jobs", "allocations", cascade=True),
        sa.PrimaryKeyConstraint("id", name="pk_allocations"),
    )
    op.create_index("ix_allocations_job_id", "allocations", ["job_id"])
    op.create_table(
        "fronts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=False),
        sa.Column("axes", sa.JSON(), nullable=False),
        sa.Column("solver", sa.String(32), nullable=False),
        _time("created_at"),
        _fk("job_id", "jobs", "fronts", cascade=True), _fk("profile_id", "profiles", "fronts"),
        sa.PrimaryKeyConstraint("id", name="pk_fronts"),
        sa.UniqueConstraint("job_id", name="uq_fronts_job_id"),
    )
    op.create_table(
        "points",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("front_id", sa.Integer(), nullable=False),
        sa.Column("allocation_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("on_front", sa.Boolean(), nullable=False),
        sa.Column("chosen", sa.Boolean(), nullable=False),
        _fk("allocation_id", "allocations", "points", cascade=True), _fk("front_id", "fronts", "points", cascade=True),
        sa.PrimaryKeyConstraint("id", name="pk_points"),
    )
    op.create_index("ix_points_front_id", "points", ["front_id"])
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("media_type", sa.String(100), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        _time("created_at"),
        _fk("job_id", "jobs", "artifacts", cascade=True), _fk("token_id", "tokens", "artifacts"),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.UniqueConstraint("job_id", "kind", "sha256", name="uq_artifacts_job_kind_sha256"),
    )
    op.create_index("ix_artifacts_job_id", "artifacts", ["job_id"])
    op.create_index("ix_artifacts_token_id", "artifacts", ["token_id"])


def downgrade() -> None:
    for table in ("artifacts", "points", "fronts", "allocations", "job_logs", "jobs", "profiles", "tokens"):
        op.drop_table(table)
