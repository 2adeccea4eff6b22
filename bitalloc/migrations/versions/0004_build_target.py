"""A build names its target (``bitalloc``, ``gguf``, ``compressed-tensors``): a ``target`` column
on ``builds``, ``bitalloc`` for every build made before targets existed. A build's request hash
now covers its target, so the stored hashes of live builds are recomputed to match. Stored job
requests may now name where they compute (``device``, ``max_memory``, ``stream``); the downgrade
drops those keys, so that 0003's downgrade can name the latency target ``device`` again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.Uuid()), sa.column("kind", sa.String()), sa.column("spec", sa.JSON()),
                sa.column("request_hash", sa.String()))
COMPUTE_KEYS = ("device", "max_memory", "stream")
builds = sa.table("builds", sa.column("job_id", sa.Uuid()), sa.column("point_id", sa.Integer()),
                  sa.column("method", sa.String()))


def _rehash(with_target: bool) -> None:
    """The hash ``service.builds.request_hash`` gives each build (as of this revision, or the one before)."""
    connection = op.get_bind()
    for job_id, point_id, method in connection.execute(sa.select(builds.c.job_id, builds.c.point_id, builds.c.method)):
        request = {"point_id": point_id, "method": method, **({"target": "bitalloc"} if with_target else {})}
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(request_hash=digest))


def upgrade() -> None:
    op.add_column("builds", sa.Column("target", sa.String(32), nullable=False, server_default="bitalloc"))
    _rehash(with_target=True)


def _drop_compute_keys() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.kind == "compress")).all()
    for job_id, spec in rows:
        if isinstance(spec, dict) and any(key in spec for key in COMPUTE_KEYS):
            kept = {key: value for key, value in spec.items() if key not in COMPUTE_KEYS}
            connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(spec=kept))


def downgrade() -> None:
    _drop_compute_keys()
    op.execute("DELETE FROM jobs WHERE id IN (SELECT job_id FROM builds WHERE target != 'bitalloc')")
    _rehash(with_target=False)
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("target")
