"""A job's latency target is named ``hardware`` (it was ``device``, which now names where a
job computes): stored job requests are renamed so that queued jobs run and old jobs read
back with today's names. Data only, no schema change.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.Uuid()), sa.column("kind", sa.String()), sa.column("spec", sa.JSON()))


def _rename(old: str, new: str) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.kind == "compress")).all()
    for job_id, spec in rows:
        if isinstance(spec, dict) and old in spec:
            renamed = {(new if key == old else key): value for key, value in spec.items()}
            connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(spec=renamed))


def upgrade() -> None:
    _rename("device", "hardware")


def downgrade() -> None:
    _rename("hardware", "device")
