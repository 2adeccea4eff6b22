"""Fixtures for the service: apps on the embedded default or on the real PostgreSQL + Redis.

PostgreSQL tests run in a schema of their own per session (dropped at the end; per test with
``own_pg_url``), Redis tests on a queue of their own per test, so concurrent runs on one
server do not collide.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bitalloc.service.settings import Settings


def base_pg_url() -> str:
    base = os.environ.get("BITALLOC_TEST_DATABASE_URL")
    if not base:
        pytest.skip("BITALLOC_TEST_DATABASE_URL is not set")
    return base


@contextmanager
def schema_of_its_own(base: str) -> Iterator[str]:
    """A database URL whose tables live in a new schema, dropped afterwards."""
    schema = f"bitalloc_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with schema_of_its_own(base_pg_url()) as url:
        yield url


@pytest.fixture
def own_pg_url() -> Iterator[str]:
    """A schema for one test alone: where it asserts on every job (a reaper sees them all),
    no other test's jobs may be there, whose leases run out when the suite runs slowly."""
    with schema_of_its_own(base_pg_url()) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("BITALLOC_TEST_REDIS_URL")
    if not url:
        pytest.skip("BITALLOC_TEST_REDIS_URL is not set")
    return url


@pytest.fixture
def queue_name(redis_url) -> Iterator[str]:
    """A queue of this test's own; its jobs, registries and workers' keys are removed afterwards."""
    from redis import Redis
    from rq import Queue

    name = f"bitalloc-test-{uuid.uuid4().hex[:12]}"
    yield name
    connection = Redis.from_url(redis_url)
    queue = Queue(name, connection=connection)
    registries = [queue.started_job_registry, queue.finished_job_registry, queue.failed_job_registry,
                  queue.canceled_job_registry]
    for job_id in {job_id for registry in registries for job_id in registry.get_job_ids()} | set(queue.job_ids):
        for key in connection.scan_iter(match=f"rq:*{job_id}*"):
            connection.delete(key)
    queue.delete(delete_jobs=True)
    for key in connection.scan_iter(match=f"rq:*{name}*"):
        connection.delete(key)
    connection.close()


@pytest.fixture
def embedded_settings(tmp_path) -> Settings:
    """The embedded default (SQLite under the data dir), with fast heartbeats for tests."""
    return Settings(data_dir=tmp_path / "data", heartbeat_seconds=0.3, lease_seconds=30, reaper_seconds=3600)


@pytest.fixture
def queued_settings(tmp_path, pg_url, redis_url, queue_name) -> Settings:
    """Scaled out: PostgreSQL + RQ on Redis."""
    return Settings(data_dir=tmp_path / "data", database_url=pg_url, redis_url=redis_url, queue_name=queue_name,
                    heartbeat_seconds=0.3, lease_seconds=30, reaper_seconds=3600)


@pytest.fixture(scope="session")
def model_root(tiny_llama, tmp_path_factory) -> Path:
    """A model root holding the tiny random Llama as safetensors shards (``tiny``: a streamable folder)."""
    root = tmp_path_factory.mktemp("models")
    tiny_llama.module.save_pretrained(root / "tiny", max_shard_size="100KB")
    tiny_llama.tokenizer.save_pretrained(root / "tiny")
    return root
