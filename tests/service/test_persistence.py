"""Migrations on both databases (and the data they keep), the token and db commands, the artifact store, progress records."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic import command
from service_helpers import job_body, running_app
from sqlalchemy import JSON, DateTime, Uuid, column, create_engine, insert, inspect, select, table, text
from sqlalchemy.sql.expression import ColumnClause, TableClause
from typer.testing import CliRunner

from bitalloc.service.cli import app
from bitalloc.service.db import alembic_config, current_revision, head_revision, make_engine, upgrade
from bitalloc.service.models import TokenRecord
from bitalloc.service.progress import ProgressTracker
from bitalloc.service.settings import Settings, get_settings
from bitalloc.service.storage import BlobStore

TABLES = {"tokens", "jobs", "job_logs", "profiles", "fronts", "points", "allocations", "artifacts", "builds", "shards",
          "alembic_version"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def empty_database(request, tmp_path) -> Iterator[str]:
    """A database with nothing in it: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/m.db"
        return
    base = os.environ.get("BITALLOC_TEST_DATABASE_URL") or pytest.skip("BITALLOC_TEST_DATABASE_URL is not set")
    schema = f"bitalloc_migrations_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_migrations_run_up_down_and_up_again(empty_database):
    engine = make_engine(empty_database)
    upgrade(engine)
    assert current_revision(engine) == head_revision() == "0006"
    assert TABLES <= set(inspect(engine).get_table_names())
    upgrade(engine)  # again: a no-op, as at every start
    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(engine)
    assert current_revision(engine) == "0006"
    engine.dispose()


def jobs_table(*more: ColumnClause) -> TableClause:
    """The jobs table as 0001 made it (plus ``more``), to write rows whatever the models say now."""
    return table("jobs", column("id", Uuid), column("created_at", DateTime(timezone=True)), *more,
                 *(column(name) for name in ("token_id", "request_hash", "state", "spec", "progress", "attempts",
                                             "max_attempts", "timeout_seconds", "cancel_requested")))


def json_jobs_table(*more: ColumnClause) -> TableClause:
    """The jobs table as 0002 left it (plus ``more``), its request read and written as JSON."""
    return table("jobs", column("id", Uuid), column("created_at", DateTime(timezone=True)), column("spec", JSON),
                 column("progress", JSON), *more, *(column(name) for name in (
                     "kind", "token_id", "request_hash", "state", "attempts", "max_attempts", "timeout_seconds",
                     "cancel_requested")))


def test_builds_migration_keeps_every_job_as_a_compression_job_and_its_downgrade_only_drops_builds(empty_database):
    engine = make_engine(empty_database)
    upgrade(engine, "0001")
    jobs = jobs_table()
    logs = table("job_logs", column("job_id", Uuid), column("at", DateTime(timezone=True)), column("level"),
                 column("message"))
    row = {"token_id": 1, "state": "succeeded", "spec": "{}", "progress": "{}", "attempts": 1, "max_attempts": 3,
           "timeout_seconds": 60.0, "cancel_requested": False, "created_at": datetime.now(UTC)}
    compress, build = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tokens (id, name, token_hash, prefix, created_at) "
                                "VALUES (1, 't', 'h', 'p', CURRENT_TIMESTAMP)"))
        connection.execute(insert(jobs).values(id=compress, request_hash="a", **row))
        connection.execute(insert(logs).values(job_id=compress, at=datetime.now(UTC), level="info", message="kept"))
    upgrade(engine)
    with engine.begin() as connection:
        assert connection.execute(text("SELECT kind FROM jobs")).scalars().all() == ["compress"]
        connection.execute(insert(jobs_table(column("kind"))).values(id=build, request_hash="b", kind="artifact", **row))
        connection.execute(insert(logs).values(job_id=build, at=datetime.now(UTC), level="info", message="dropped"))
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert current_revision(engine) == "0001" and "builds" not in inspect(engine).get_table_names()
    assert "kind" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.connect() as connection:
        assert connection.execute(select(jobs.c.id)).scalars().all() == [compress]
        assert connection.execute(select(logs.c.message)).scalars().all() == ["kept"]
    engine.dispose()


def test_stored_requests_name_the_latency_target_hardware_after_0003_and_device_after_the_downgrades(empty_database):
    engine = make_engine(empty_database)
    upgrade(engine, "0002")
    jobs = json_jobs_table()
    before = {"model": "zoo:llm", "formats": ["int4_g128"], "device": "a100", "points": 8}
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tokens (id, name, token_hash, prefix, created_at) "
                                "VALUES (1, 't', 'h', 'p', CURRENT_TIMESTAMP)"))
        connection.execute(insert(jobs).values(
            id=uuid.uuid4(), kind="compress", token_id=1, request_hash="a", state="queued", spec=before, progress={},
            attempts=0, max_attempts=3, timeout_seconds=60.0, cancel_requested=False, created_at=datetime.now(UTC)))
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.execute(select(jobs.c.spec)).scalars().all() == [
            {"model": "zoo:llm", "formats": ["int4_g128"], "hardware": "a100", "points": 8}]
    with engine.begin() as connection:  # as a job made since 0004 stores it: where it computes, too
        connection.execute(jobs.update().values(spec={"model": "zoo:llm", "formats": ["int4_g128"], "hardware": "a100",
                                                      "points": 8, "device": "cuda", "max_memory": 2**30, "stream": True}))
    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")
    with engine.connect() as connection:
        assert connection.execute(select(jobs.c.spec)).scalars().all() == [before]
    engine.dispose()


def test_builds_made_before_targets_are_bitalloc_builds_whose_request_hash_still_finds_them(empty_database):
    """0004: an old build gets target ``bitalloc`` and the hash a new request for it computes (so asking
    again finds it); the downgrade drops builds of other targets and restores the old hash."""
    from bitalloc.service.builds import request_hash

    engine = make_engine(empty_database)
    upgrade(engine, "0003")
    now = datetime.now(UTC)
    parent, build = uuid.uuid4(), uuid.uuid4()
    old_hash = hashlib.sha256(b'{"method": "rtn", "point_id": 1}').hexdigest()
    jobs = jobs_table(column("kind"))
    row = {"token_id": 1, "state": "succeeded", "spec": "{}", "progress": "{}", "attempts": 1, "max_attempts": 3,
           "timeout_seconds": 60.0, "cancel_requested": False, "created_at": now}
    dated = {"created_at": now}
    rows = [
        (table("profiles", *map(column, ("id", "key", "sha256", "size", "model", "metric", "method", "units", "formats",
                                          "meta")), column("created_at", DateTime(timezone=True))),
         {"id": 1, "key": "k", "sha256": "s", "size": 1, "model": "m", "metric": "output_mse", "method": "rtn",
          "units": 1, "formats": "[]", "meta": "{}", **dated}),
        (table("fronts", column("id"), column("job_id", Uuid), *map(column, ("profile_id", "axes", "solver")),
               column("created_at", DateTime(timezone=True))),
         {"id": 1, "job_id": parent, "profile_id": 1, "axes": "[]", "solver": "dp", **dated}),
        (table("allocations", column("id"), column("job_id", Uuid),
               *map(column, ("formats", "bytes", "avg_bits", "error", "solver", "info"))),
         {"id": 1, "job_id": parent, "formats": "{}", "bytes": 1, "avg_bits": 4.0, "error": 0.1, "solver": "dp",
          "info": "{}"}),
        (table("points", *map(column, ("id", "front_id", "allocation_id", "rank", "on_front", "chosen"))),
         {"id": 1, "front_id": 1, "allocation_id": 1, "rank": 0, "on_front": True, "chosen": True}),
        (table("builds", column("job_id", Uuid), column("parent_id", Uuid), column("point_id"), column("method")),
         {"job_id": build, "parent_id": parent, "point_id": 1, "method": "rtn"}),
    ]
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tokens (id, name, token_hash, prefix, created_at) "
                                "VALUES (1, 't', 'h', 'p', CURRENT_TIMESTAMP)"))
        connection.execute(insert(jobs).values(id=parent, kind="compress", request_hash="a", **row))
        connection.execute(insert(jobs).values(id=build, kind="artifact", request_hash=old_hash, **row))
        for target, values in rows:
            connection.execute(insert(target).values(**values))
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT target FROM builds")).scalars().all() == ["bitalloc"]
        stored = connection.execute(text("SELECT request_hash FROM jobs WHERE kind = 'artifact'")).scalar_one()
    assert stored == request_hash(1, "rtn", "bitalloc") != old_hash
    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT request_hash FROM jobs WHERE kind = 'artifact'")).scalar_one() == old_hash
    assert "target" not in {c["name"] for c in inspect(engine).get_columns("builds")}
    engine.dispose()


def test_compress_jobs_get_the_spec_they_run_from_their_request_and_the_downgrade_only_drops_it(empty_database):
    """0005: a stored request gets the pipeline's spec today's schema makes of it (the schema checks the
    migration's frozen copy of the conversion), defaults filled in for a request older than some fields;
    a request it cannot read, and a build, keep NULL. The downgrade keeps every job and its log."""
    from bitalloc.service.schemas import JobCreate

    def as_stored(body: dict) -> dict:
        """A request as the API stored it at 0004: without the fields later revisions added."""
        return JobCreate.model_validate(body).model_dump(mode="json", exclude={"shards"})

    engine = make_engine(empty_database)
    upgrade(engine, "0004")
    requests = {
        "api": as_stored(job_body(
            metric="fisher_mse", budgets={"kl": 0.5, "bytes": 4096, "latency": 0.01}, kv_cache={"context": 64},
            calibration={"source": "zoo:calibration", "seq_len": 32, "samples": 4, "bos": True},
            evaluation={"source": None}, max_memory="1GiB", device="cpu", dtype="bf16", method="gptq", descend=2,
            ties=False)),
        "target": as_stored(job_body(budgets={"measured_kl": 0.05})),
        "old": {"model": "zoo:llm", "formats": ["int4_g128"], "hardware": "a100", "points": 8},
    }
    unreadable = {"model": "zoo:llm", "formats": ["int4_g128"], "budgets": {"bits": 4}}
    jobs = json_jobs_table(column("run_spec", JSON))
    logs = table("job_logs", column("job_id", Uuid), column("at", DateTime(timezone=True)), column("level"),
                 column("message"))
    ids = {name: uuid.uuid4() for name in [*requests, "unreadable", "build"]}
    row = {"token_id": 1, "state": "queued", "progress": {}, "attempts": 0, "max_attempts": 3, "timeout_seconds": 60.0,
           "cancel_requested": False, "created_at": datetime.now(UTC)}
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tokens (id, name, token_hash, prefix, created_at) "
                                "VALUES (1, 't', 'h', 'p', CURRENT_TIMESTAMP)"))
        for name, spec in [*requests.items(), ("unreadable", unreadable), ("build", {"method": "rtn"})]:
            kind = "artifact" if name == "build" else "compress"
            connection.execute(insert(json_jobs_table()).values(id=ids[name], kind=kind, request_hash=name, spec=spec,
                                                                **row))
        connection.execute(insert(logs).values(job_id=ids["api"], at=datetime.now(UTC), level="info", message="kept"))
    upgrade(engine)
    with engine.connect() as connection:
        stored = dict(connection.execute(select(jobs.c.id, jobs.c.run_spec)).all())
    for name, request in requests.items():
        assert stored[ids[name]] == JobCreate.model_validate(request).to_spec().to_dict(), name
    assert stored[ids["api"]]["kv"] == {"context": 64, "batch": 1} and stored[ids["api"]]["max_memory"] == 2**30
    assert stored[ids["unreadable"]] is None and stored[ids["build"]] is None
    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0004")
    assert "run_spec" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.connect() as connection:
        assert sorted(connection.execute(select(jobs.c.request_hash)).scalars()) == sorted(ids)
        assert connection.execute(select(logs.c.message)).scalars().all() == ["kept"]
    engine.dispose()


def test_token_create_prints_the_token_last_and_stores_only_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        upgraded = runner.invoke(app, ["db", "upgrade"])
        assert upgraded.exit_code == 0 and "revision 0006" in upgraded.output
        created = runner.invoke(app, ["token", "create", "--name", "ci"])
        assert created.exit_code == 0, created.output
        secret = created.stdout.strip().splitlines()[-1]
        assert secret.startswith("bat_") and len(secret) > 40
        with running_app(Settings(data_dir=tmp_path / "data", worker_threads=0)) as (client, ctx):
            with ctx.sessions() as session:
                token = session.scalar(select(TokenRecord).where(TokenRecord.name == "ci"))
            assert token.token_hash == hashlib.sha256(secret.encode()).hexdigest() and secret not in token.prefix + token.name
            headers = {"Authorization": f"Bearer {secret}"}
            assert client.post("/v1/jobs", json=job_body(), headers=headers).status_code == 201
            assert runner.invoke(app, ["token", "revoke", "--name", "ci"]).exit_code == 0
            assert client.get("/v1/jobs", headers=headers).status_code == 401
        assert runner.invoke(app, ["token", "create", "--name", " "]).exit_code == 1
    finally:
        get_settings.cache_clear()


def test_the_store_keeps_each_content_once_by_its_sha256(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"config")
    assert sha == hashlib.sha256(b"config").hexdigest() and store.path(sha).read_bytes() == b"config"
    assert store.put_bytes(b"config") == sha and len(list((tmp_path / "blobs").rglob("*"))) == 3  # 2 folders + 1 file
    source = tmp_path / "profile.npz"
    source.write_bytes(b"x" * 3_000_000)
    assert store.put_file(source) == (hashlib.sha256(source.read_bytes()).hexdigest(), 3_000_000)
    with pytest.raises(ValueError, match="sha256"):
        store.path("../../etc/passwd")


def test_progress_names_the_phase_and_unit_and_never_goes_back():
    tracker = ProgressTracker()
    assert tracker.update(0, 1, "load") is True and tracker.snapshot() == {"phase": "load", "done": 0, "total": 1, "percent": 0.0}
    tracker.update(1, 1, "load")
    assert tracker.update(7, 14, "output_mse") is True
    assert tracker.snapshot() == {"phase": "output_mse", "done": 7, "total": 14, "percent": 50.0}
    assert tracker.update(8, 14, "output_mse") is False
    tracker.update(1, 1, "hessians")  # a phase of an earlier band cannot pull the percent back
    assert tracker.percent >= 50.0
    tracker.update(0, 1, "evaluate")
    assert tracker.percent == 90.0
    tracker.finish()
    assert tracker.snapshot()["percent"] == 100.0


def test_progress_in_a_pipe_is_plain_lines_every_few_seconds():
    import io

    from bitalloc.service.progress import progress_lines

    now = [0.0]
    out = io.StringIO()
    report = progress_lines(out, every=5.0, clock=lambda: now[0])
    report(0, 1, "load")  # a phase starts: a line
    report(1, 1, "load")  # and completes: a line
    for done in range(1, 101):  # 100 reports over 20 s: a line every 5 s, and the last
        now[0] += 0.2
        report(done, 100, "fisher_mse")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[     0 s] load") and "100 % (1/1)" in lines[1]
    metric = [line for line in lines if "fisher_mse" in line]
    assert 4 <= len(metric) <= 6 and metric[-1].startswith("[    20 s] fisher_mse     100 % (100/100)")
    assert all("overall" in line for line in lines)
