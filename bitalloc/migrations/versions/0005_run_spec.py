"""A compress job keeps the pipeline's spec it runs (``run_spec``), fixed when the API accepts it, so
the worker runs a job as it was accepted instead of revalidating the stored request through a schema
that may since have tightened. Existing compress jobs get theirs from their stored request, by the
request-to-spec conversion as of this revision, frozen here (a migration never imports the
application, whose conversion will change): a request it cannot read keeps NULL, and such a job
fails asking to be submitted again. Only an addition: the downgrade drops the column in place (a
rebuilt ``jobs`` table would cascade-delete every job's log, front and artifacts on SQLite).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

jobs = sa.table("jobs", sa.column("id", sa.Uuid()), sa.column("kind", sa.String()), sa.column("spec", sa.JSON()),
                sa.column("run_spec", sa.JSON()))

# The request's sections and their defaults as of this revision (service.schemas.JobCreate and its parts).
REQUEST = {"model": None, "formats": None, "metric": "fisher_mse", "solver": "dp", "method": "rtn", "budgets": {},
           "points": 32, "kv_cache": None, "calibration": {}, "evaluation": {}, "hardware": "h100", "dtype": "auto",
           "device": "auto", "max_memory": None, "stream": False, "baseline": None, "ties": True, "descend": 0,
           "surrogate": 0, "refine": 0}
BUDGETS = {"avg_bits": None, "bytes": None, "latency": None, "kl": None, "error": None, "measured_kl": None}
KV_CACHE = {"context": 4096, "batch": 1}
CALIBRATION = {"source": None, "samples": 32, "seq_len": 512, "seed": 0, "bos": None}
EVALUATION = {"source": "zoo:evaluation", "windows": 16}


def _section(value: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """One part of the request with its defaults filled in; a key the schema never had is refused."""
    if not isinstance(value, dict) or set(value) - set(defaults):
        raise ValueError(f"not a request this revision reads: {value!r}")
    return {**defaults, **value}


def _number(value: Any, kind: type) -> Any:
    """A budget as ``search.Budgets`` keeps it: bytes a whole number, the other limits floats."""
    return None if value is None else kind(value)


def _run_spec(spec: Any) -> dict[str, Any]:
    """``JobCreate.model_validate(spec).to_spec().to_dict()`` as of this revision, on plain data."""
    request = _section(spec, REQUEST)
    budgets = _section(request["budgets"], BUDGETS)
    calibration = _section(request["calibration"], CALIBRATION)
    evaluation = _section(request["evaluation"], EVALUATION)
    kv = None if request["kv_cache"] is None else _section(request["kv_cache"], KV_CACHE)
    if not isinstance(request["model"], str) or not isinstance(request["formats"], list):
        raise ValueError("a request names its model and its formats")
    if request["max_memory"] is not None and not isinstance(request["max_memory"], int):
        raise ValueError("max_memory is stored in bytes (the API parses \"24GiB\" before it stores the request)")
    error = budgets["kl"] if budgets["kl"] is not None else budgets["error"]
    return {
        "model": request["model"], "formats": list(request["formats"]), "metric": request["metric"],
        "solver": request["solver"], "method": request["method"],
        "budgets": {"max_bytes": _number(budgets["bytes"], int), "max_avg_bits": _number(budgets["avg_bits"], float),
                    "max_latency": _number(budgets["latency"], float), "max_error": _number(error, float)},
        "measured_kl": budgets["measured_kl"], "points": request["points"],
        "calibration": calibration["source"], "seq_len": calibration["seq_len"], "samples": calibration["samples"],
        "seed": calibration["seed"], "bos": calibration["bos"],
        "kv": None if kv is None else {"context": kv["context"], "batch": kv["batch"]},
        "hardware": request["hardware"], "dtype": request["dtype"], "device": request["device"],
        "max_memory": request["max_memory"], "stream": request["stream"], "shards": 1,
        "evaluation": evaluation["source"], "eval_windows": evaluation["windows"], "baseline": request["baseline"],
        "refine": request["refine"], "descend": request["descend"], "surrogate": request["surrogate"],
        "fitness_windows": 8, "gradient_windows": 8, "ties": request["ties"],
    }


def upgrade() -> None:
    op.add_column("jobs", sa.Column("run_spec", sa.JSON(), nullable=True))
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.kind == "compress")).all()
    for job_id, spec in rows:
        try:
            run_spec = _run_spec(spec)
        except (TypeError, ValueError):
            continue  # stays NULL: the worker fails the job, asking for it to be submitted again
        connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(run_spec=run_spec))


def downgrade() -> None:
    op.drop_column("jobs", "run_spec")
