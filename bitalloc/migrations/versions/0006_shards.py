"""Shards of a streamed profile: a ``shard`` job kind, and the ``shards`` table that says which
block range of which compress job each such job measures.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


BEFORE = "kind IN ('compress', 'artifact')"
AFTER = "kind IN ('compress', 'artifact', 'shard')"


def _kinds(old: str, new: str) -> None:
    """Replace the ``kind`` check. SQLite cannot alter a constraint, and rebuilding ``jobs`` (batch
    mode) would cascade its implicit delete into every table that points at it; so, as SQLite's
    documentation prescribes for loosening a CHECK, the stored schema text is edited in place and
    the schema version bumped (the rows satisfy both checks: the downgrade drops shards first)."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint(op.f("ck_jobs_kind"), "jobs", type_="check")
        op.create_check_constraint(op.f("ck_jobs_kind"), "jobs", new)
        return
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar()
    bind.exec_driver_sql("PRAGMA writable_schema=ON")
    edited = bind.execute(sa.text("UPDATE sqlite_master SET sql = replace(sql, :old, :new) "
                                  "WHERE type = 'table' AND name = 'jobs' AND instr(sql, :old) > 0"),
                          {"old": old, "new": new}).rowcount
    bind.exec_driver_sql(f"PRAGMA schema_version={int(version) + 1}")
    bind.exec_driver_sql("PRAGMA writable_schema=OFF")
    if edited != 1:
        raise RuntimeError(f"the jobs table's kind check is not {old!r}: cannot change it")


def _fk(column: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], ["jobs.id"], name=f"fk_shards_{column}_jobs", ondelete="CASCADE")


def upgrade() -> None:
    _kinds(BEFORE, AFTER)
    op.create_table(
        "shards",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("parent_id", sa.Uuid(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("first_block", sa.Integer(), nullable=False),
        sa.Column("stop_block", sa.Integer(), nullable=False),
        sa.Column("inputs_sha256", sa.String(64), nullable=False),
        sa.Column("rows_sha256", sa.String(64), nullable=True),
        _fk("job_id"), _fk("parent_id"),
        sa.PrimaryKeyConstraint("job_id", name="pk_shards"),
        sa.UniqueConstraint("parent_id", "inputs_sha256", "index", name="uq_shards_parent_inputs_index"),
    )
    op.create_index("ix_shards_parent_id", "shards", ["parent_id"])


def downgrade() -> None:
    # Shard jobs go with the shards table (their logs cascade); their parents keep what they stored.
    op.execute("DELETE FROM jobs WHERE kind = 'shard'")
    op.drop_table("shards")
    _kinds(AFTER, BEFORE)
