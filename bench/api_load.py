"""Load on the REST API: requests per second and p50/p99 latency for reading a front, downloading
a configuration and submitting jobs, against a local `bitalloc serve` on PostgreSQL.

Setup: a schema of its own in the given PostgreSQL database, a token, and one real job (the
tiny random Llama, through the same executor the workers use) whose front the reads hit.
The server runs as a separate process (`bitalloc serve`, one uvicorn process, loopback only)
with no worker threads, so submitted jobs stay queued and the numbers are the API's and the
database's alone (with --redis-url, submissions also enqueue on RQ). Every scenario sends a
fixed number of requests from a fixed number of client threads, then everything is removed.

Front reads also run with ``--many-clients`` (50) threads, plain and revalidating with the
front's ETag (a 304 with no body).

    python -m bench.api_load [--database-url URL] [--redis-url URL] [--requests 400] [--concurrency 8]

Prints a table and writes bench/results/api_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import create_engine, text

if not __package__:  # run as a file: bench/kernels.py would shadow the kernels package
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

JOB = {"model": "factory:tiny-llama", "formats": ["int2_g32", "int4_g32", "int8_g32"], "budgets": {"avg_bits": 5.0},
       "points": 32, "calibration": {"seq_len": 32, "samples": 4}, "evaluation": {"windows": 2}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed(settings) -> tuple[str, str, int, int]:
    """A token and one finished job (run by the workers' executor); returns (token, job id, chosen point, points)."""
    from bitalloc.service.auth import create_token
    from bitalloc.service.context import Context
    from bitalloc.service.db import transaction
    from bitalloc.service.executor import Executor
    from bitalloc.service.jobs import submit
    from bitalloc.service.models import JobRecord
    from bitalloc.service.schemas import JobCreate

    ctx = Context.create(settings)
    with transaction(ctx.sessions) as session:
        token, secret = create_token(session, "bench")
        job, _ = submit(session, token.id, JobCreate.model_validate(JOB), settings)
    if Executor(ctx).run(job.id) != "succeeded":
        raise SystemExit("the seed job did not succeed")
    with ctx.sessions() as session:
        stored = session.get(JobRecord, job.id)
        chosen, points = stored.result["chosen_point_id"], len(stored.front.points)
    ctx.close()
    return secret, str(job.id), chosen, points


def measure(base_url: str, headers: dict, method: str, path: str, body: dict | None, requests: int,
            concurrency: int) -> dict:
    """``requests`` calls from ``concurrency`` threads (each with its own keep-alive connection)."""
    per_thread = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def run(count: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
            for _ in range(count):
                start = time.perf_counter()
                response = client.request(method, path, json=body)
                latencies.append(time.perf_counter() - start)
                errors += response.status_code >= 400
        return latencies, errors

    with ThreadPoolExecutor(concurrency) as pool:  # warm up: connections, caches, the server's thread pool
        list(pool.map(run, [max(1, n // 10) for n in per_thread]))
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(run, per_thread))
    wall = time.perf_counter() - start
    latencies = np.array([x for lat, _ in outcomes for x in lat]) * 1e3
    return {"requests": int(latencies.size), "concurrency": concurrency, "seconds": round(wall, 3),
            "rps": round(latencies.size / wall, 1), "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2), "errors": sum(e for _, e in outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("BITALLOC_TEST_DATABASE_URL"),
                        help="PostgreSQL (SQLAlchemy URL); default $BITALLOC_TEST_DATABASE_URL")
    parser.add_argument("--redis-url", default=os.environ.get("BITALLOC_TEST_REDIS_URL"),
                        help="also enqueue submissions on RQ; default $BITALLOC_TEST_REDIS_URL")
    parser.add_argument("--requests", type=int, default=400, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--many-clients", type=int, default=50, help="client threads of the front-read runs under load")
    parser.add_argument("--server-workers", type=int, default=1, help="API processes (`bitalloc serve --workers`; "
                        "more than one needs --redis-url)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "api_load.json")
    args = parser.parse_args()
    if not args.database_url or not args.database_url.startswith("postgresql"):
        raise SystemExit("give a PostgreSQL --database-url (or set BITALLOC_TEST_DATABASE_URL)")

    from bitalloc.service.settings import Settings

    schema = f"bitalloc_bench_{uuid.uuid4().hex[:10]}"
    queue = f"bitalloc-bench-{uuid.uuid4().hex[:10]}"
    url = f"{args.database_url}{'&' if '?' in args.database_url else '?'}options=-csearch_path%3D{schema}"
    data_dir = Path(tempfile.mkdtemp(prefix="bitalloc-bench-"))
    admin = create_engine(args.database_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    server = None
    try:
        settings = Settings(data_dir=data_dir, database_url=url, redis_url=args.redis_url, queue_name=queue)
        print("seeding: one tiny-llama job through the executor ...", flush=True)
        secret, job_id, chosen, points = seed(settings)
        port = free_port()
        env = {**os.environ, "BITALLOC_DATABASE_URL": url, "BITALLOC_DATA_DIR": str(data_dir),
               "BITALLOC_WORKER_THREADS": "0", "BITALLOC_QUEUE_NAME": queue}
        env.pop("BITALLOC_REDIS_URL", None)
        if args.redis_url:
            env["BITALLOC_REDIS_URL"] = args.redis_url
        server = subprocess.Popen([str(Path(sys.executable).parent / "bitalloc"), "serve", "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", str(args.server_workers)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base_url}/v1/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)

        headers = {"Authorization": f"Bearer {secret}"}
        front = f"/v1/jobs/{job_id}/front"
        etag = httpx.get(f"{base_url}{front}", headers=headers).headers["ETag"]
        many = args.many_clients
        scenarios = {  # name: (method, path, body, extra headers, client threads)
            "health (no database)": ("GET", "/v1/health", None, {}, args.concurrency),
            f"read front ({points} points)": ("GET", front, None, {}, args.concurrency),
            f"read front, {many} clients": ("GET", front, None, {}, many),
            f"revalidate front (304), {many} clients": ("GET", front, None, {"If-None-Match": etag}, many),
            "download config (json)": ("GET", f"/v1/jobs/{job_id}/points/{chosen}/config?format=json", None, {},
                                       args.concurrency),
            "submit job": ("POST", "/v1/jobs", JOB, {}, args.concurrency),
        }
        rows = {}
        print(f"\n{'scenario':<34} {'requests':>8} {'threads':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for name, (method, path, body, extra, threads) in scenarios.items():
            row = measure(base_url, {**headers, **extra}, method, path, body, args.requests, threads)
            rows[name] = row
            print(f"{name:<34} {row['requests']:>8} {row['concurrency']:>7} {row['rps']:>8.1f} {row['p50_ms']:>8.2f} "
                  f"{row['p99_ms']:>8.2f} {row['errors']:>6}")
        results = {
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
            "setup": {"server": f"bitalloc serve ({args.server_workers} uvicorn process(es), loopback)",
                      "database": "postgresql",
                      "queue": "rq on redis" if args.redis_url else "none (jobs stay queued)",
                      "client": f"{args.concurrency} httpx threads ({args.many_clients} where the scenario says so) in "
                                "one process on the same machine, each request after the last one answered"},
            "scenarios": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        if args.redis_url:
            from redis import Redis
            from rq import Queue

            redis = Redis.from_url(args.redis_url)
            Queue(queue, connection=redis).delete(delete_jobs=True)
            for key in redis.scan_iter(match=f"rq:*{queue}*"):
                redis.delete(key)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
