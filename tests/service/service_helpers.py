"""Helpers shared by the service tests: a tiny job, tokens, apps and a real server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bitalloc.service.app import create_app
from bitalloc.service.auth import create_token
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.settings import Settings

FORMATS = ["int2_g32", "int4_g32", "int8_g32"]
FINISHED = ("succeeded", "failed", "canceled")


def job_body(**overrides) -> dict:
    """A job on the tiny random Llama with tiny settings (seconds, not minutes)."""
    body = {"model": "factory:tiny-llama", "formats": FORMATS, "metric": "output_mse", "solver": "dp",
            "budgets": {"avg_bits": 5.0}, "points": 6, "calibration": {"seq_len": 32, "samples": 4},
            "evaluation": {"windows": 2}}
    return {**body, **overrides}


def metric(client: TestClient, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def bearer(ctx: Context, name: str = "test") -> dict[str, str]:
    with transaction(ctx.sessions) as session:
        _, secret = create_token(session, name)
    return {"Authorization": f"Bearer {secret}"}


def wait_until_finished(client: TestClient, headers: dict, job_id: str, timeout: float = 120.0,
                        path: str = "jobs") -> dict:
    """Poll ``/v1/{path}/{job_id}`` (a job, or a build with ``path="builds"``) until it finishes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/{path}/{job_id}", headers=headers).json()
        if job["state"] in FINISHED:
            return job
        time.sleep(0.2)
    raise AssertionError(f"{path} {job_id} did not finish in {timeout} s: {job}")


@contextmanager
def running_app(settings: Settings) -> Iterator[tuple[TestClient, Context]]:
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.ctx


@contextmanager
def uvicorn_server(app: FastAPI) -> Iterator[str]:
    """A real HTTP server on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
