"""One job's streamed profile over RQ workers: the same sharded profile with 1 and with 2 workers.

* **Model.** A random Llama of ``bench.scale``'s shapes (``--size``), written once as bf16 shards.
* **Service.** PostgreSQL (a schema of its own per run, dropped afterwards) and RQ on Redis, as
  scaled out; each run gets a data folder of its own, so no run reuses another's profile. The
  job is submitted as the API submits it, and ``bitalloc worker`` processes (``--workers``, one
  torch thread each) take it: the job's own worker plans the shards and measures what no other
  worker took, the others measure the rest.
* **Output.** The profile phase's seconds (what the shards split) and the job's wall time per
  worker count, their ratio to one worker, and where each shard ran; a table and
  ``bench/results/workers.json``.

    python -m bench.workers [--size 0.4B] [--shards 4] [--workers 1,2] [--metric fisher_mse] [--method gptq]
                            [--windows 2] [--seq-len 256] [--formats int4_g128,int8_g128]
                            [--database-url URL] [--redis-url URL] [--out workers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, select, text

from bench.scale import SIZES, write_llama

RESULTS = Path(__file__).resolve().parent / "results"
DATABASE = os.environ.get("BITALLOC_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("BITALLOC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def own_schema(base: str) -> tuple[str, str]:
    """A fresh PostgreSQL schema and the URL that works in it."""
    schema = f"bitalloc_bench_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base)
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return schema, f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"


def drop_schema(base: str, schema: str) -> None:
    engine = create_engine(base)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def process_of(session, job_id: uuid.UUID) -> str:
    """The process that ran a job's first attempt, from its log ("attempt 1 of n on host:pid:thread")."""
    from bitalloc.service.models import JobLogRecord

    line = session.scalar(select(JobLogRecord.message).where(JobLogRecord.job_id == job_id,
                                                              JobLogRecord.message.like("attempt %"))
                          .order_by(JobLogRecord.id).limit(1))
    return ":".join(line.split(" on ", 1)[1].split(":")[:2])


def run(folder: Path, workers: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Submit the sharded job, let ``workers`` worker processes run it; its timings and shards."""
    from bitalloc.service import jobs, shards
    from bitalloc.service.auth import create_token
    from bitalloc.service.context import Context
    from bitalloc.service.db import transaction
    from bitalloc.service.models import JobRecord
    from bitalloc.service.schemas import JobCreate
    from bitalloc.service.settings import Settings

    schema, url = own_schema(args.database_url)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    data = workdir / f"data-{workers}"
    settings = Settings(data_dir=data, database_url=url, redis_url=args.redis_url, queue_name=queue,
                        model_roots=[folder.parent], job_timeout=24 * 3600)
    ctx = Context.create(settings)
    env = {**os.environ, "BITALLOC_DATABASE_URL": url, "BITALLOC_REDIS_URL": args.redis_url,
           "BITALLOC_QUEUE_NAME": queue, "BITALLOC_DATA_DIR": str(data), "BITALLOC_AUTO_MIGRATE": "0",
           "BITALLOC_MODEL_ROOTS": json.dumps([str(folder.parent)]), "OMP_NUM_THREADS": "1",
           "BITALLOC_JOB_TIMEOUT": str(24 * 3600)}
    processes = [subprocess.Popen([str(Path(sys.executable).parent / "bitalloc"), "worker"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        from rq import Worker

        while len(Worker.all(queue=ctx.queue.rq)) < workers:
            time.sleep(0.2)
        body = {"model": str(folder), "formats": args.formats.split(","), "metric": args.metric, "method": args.method,
                "solver": "dp",
                "budgets": {"avg_bits": 5.0}, "points": 4, "stream": True, "shards": args.shards,
                "calibration": {"seq_len": args.seq_len, "samples": args.windows}, "evaluation": {"source": None},
                "device": "cpu", "dtype": "fp32"}
        with transaction(ctx.sessions) as session:
            token = create_token(session, "bench")[0]
            job, _ = jobs.submit(session, token.id, JobCreate.model_validate(body), settings)
        start = time.perf_counter()
        ctx.queue.enqueue(job.id, 1)
        while True:
            with ctx.sessions() as session:
                record = session.get_one(JobRecord, job.id)
                if record.state in ("succeeded", "failed", "canceled"):
                    break
            time.sleep(0.5)
        wall = time.perf_counter() - start
        with ctx.sessions() as session:
            record = session.get_one(JobRecord, job.id)
            if record.state != "succeeded":
                raise RuntimeError(f"the job {record.state}: {record.error}")
            states = shards.states(session, job.id)
            home = process_of(session, job.id)
            timeline = [{"index": s.spec["shard"], "by": "parent" if process_of(session, s.id) == home else "other",
                         "started": round((s.started_at - record.started_at).total_seconds(), 1),
                         "seconds": s.seconds}
                        for s in session.scalars(select(JobRecord).where(JobRecord.kind == "shard"))]
            ran_on = [shard["by"] == "parent" for shard in timeline]
        return {"workers": workers, "wall_seconds": round(wall, 1), "profile_seconds": record.result["seconds"]["profile"],
                "shards": len(states), "shards_by_parent": ran_on.count(True),
                "shards_by_others": ran_on.count(False), "attempts": [s.attempts for s in states],
                "timeline": sorted(timeline, key=lambda shard: shard["index"])}
    finally:
        for process in processes:  # a warm shutdown would first run the leftover shard messages (no-ops)
            process.kill()
            process.wait()
        ctx.close()
        drop_schema(args.database_url, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.4B", choices=list(SIZES))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="worker counts to run the same job with")
    parser.add_argument("--metric", default="fisher_mse")
    parser.add_argument("--method", default="gptq", choices=["rtn", "gptq"], help="how each cell is quantized")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--formats", default="int4_g128,int8_g128")
    parser.add_argument("--database-url", default=DATABASE)
    parser.add_argument("--redis-url", default=REDIS)
    parser.add_argument("--out", default="workers.json")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bitalloc-workers-"))
    try:
        folder = workdir / "models" / args.size
        params = write_llama(folder, SIZES[args.size])
        rows = []
        for count in [int(c) for c in args.workers.split(",")]:
            rows.append(run(folder, count, args, workdir))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(workdir)
    base = rows[0]["profile_seconds"]
    for row in rows:
        row["profile_ratio"] = round(row["profile_seconds"] / base, 3)
    record = {"size": args.size, "params": params, "shards": args.shards, "metric": args.metric, "method": args.method, "windows": args.windows,
              "seq_len": args.seq_len, "formats": args.formats.split(","), "threads_per_worker": 1,
              "compute": "cpu, float32, streamed", "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{args.size} ({params:,} params) {args.metric} ({args.method}) profile in {args.shards} shards, "
          f"{args.windows}x{args.seq_len} tokens, 1 torch thread per worker")
    print(f"{'workers':>8}{'profile s':>11}{'ratio':>8}{'job wall s':>12}{'by parent':>11}{'by others':>11}")
    for row in rows:
        print(f"{row['workers']:>8}{row['profile_seconds']:>11}{row['profile_ratio']:>8}{row['wall_seconds']:>12}"
              f"{row['shards_by_parent']:>11}{row['shards_by_others']:>11}")


if __name__ == "__main__":
    main()
