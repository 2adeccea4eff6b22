"""Builds of a point's packed artifact: a ``kind`` on jobs, and the ``builds`` table.

A build runs as a job (kind ``artifact``), so it shares the queue, leases, retries and
timeouts; ``builds`` names its point, method and, once built, its artifact. Existing jobs
become ``compress`` jobs. Only additions: no table is rebuilt (on SQLite a rebuilt ``jobs``
would cascade-delete every job's log, front and artifacts when the old table is dropped).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LIVE_BUILD = "kind = 'artifact' AND state IN ('queued', 'running', 'succeeded')"


def _fk(column: str, table: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{table}.id"], name=f"fk_builds_{column}_{table}", ondelete=ondelete)


def upgrade() -> None:
    kinds = sa.CheckConstraint("kind IN ('compress', 'artifact')", name="kind")  # named ck_jobs_kind by convention
    op.add_column("jobs", sa.Column("kind", sa.String(16), kinds, nullable=False, server_default="compress"))
    op.create_index("ix_jobs_live_build", "jobs", ["request_hash"], unique=True,
                    sqlite_where=sa.text(LIVE_BUILD), postgresql_where=sa.text(LIVE_BUILD))
    op.create_table(
        "builds",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("parent_id", sa.Uuid(), nullable=False),
        sa.Column("point_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("artifact_id", sa.Uuid(), nullable=True),
        _fk("job_id", "jobs", "CASCADE"), _fk("parent_id", "jobs", "CASCADE"), _fk("point_id", "points", "CASCADE"),
        _fk("artifact_id", "artifacts", "SET NULL"),
        sa.PrimaryKeyConstraint("job_id", name="pk_builds"),
    )
    op.create_index("ix_builds_parent_id", "builds", ["parent_id"])
    op.create_index("ix_builds_point_id", "builds", ["point_id"])


def downgrade() -> None:
    # Build jobs go with the builds table (their logs cascade); compression jobs are untouched.
    op.execute("DELETE FROM jobs WHERE kind = 'artifact'")
    op.drop_table("builds")
    op.drop_index("ix_jobs_live_build", table_name="jobs")
    op.drop_column("jobs", "kind")
