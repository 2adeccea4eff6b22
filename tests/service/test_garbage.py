"""Stored files go when the last row naming them goes (after the delete commits, never on a
rollback), shared bytes stay while anyone still names them, and ``bitalloc gc`` sweeps orphans."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
from service_helpers import job_body, running_app
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from bitalloc.service import jobs as job_store
from bitalloc.service.api import jobs as jobs_api
from bitalloc.service.auth import create_token
from bitalloc.service.cli import app as cli
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import ArtifactRecord, JobRecord, ProfileRecord
from bitalloc.service.schemas import JobCreate
from bitalloc.service.settings import Settings, get_settings
from bitalloc.service.storage import BlobStore

HOUR = 3600.0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database_url(request) -> str | None:
    """None: the embedded SQLite file; else a PostgreSQL schema of this session's own."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def api(tmp_path, database_url):
    """The API with no worker threads: jobs and artifacts are written directly by the tests."""
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, worker_threads=0, reaper_seconds=3600)
    with running_app(settings) as (client, ctx):
        yield client, ctx


def token(ctx: Context, name: str) -> tuple[int, dict[str, str]]:
    with transaction(ctx.sessions) as session:
        row, secret = create_token(session, name)
    return row.id, {"Authorization": f"Bearer {secret}"}


def finished_job(ctx: Context, token_id: int, state: str = "succeeded") -> uuid.UUID:
    with transaction(ctx.sessions) as session:
        job, _ = job_store.submit(session, token_id, JobCreate.model_validate(job_body()), ctx.settings)
        session.execute(update(JobRecord).where(JobRecord.id == job.id).values(state=state))
    return job.id


def unique(label: str) -> bytes:
    """Bytes no other test stores (PostgreSQL tests share one schema, so rows of other tests are there)."""
    return f"{label} {uuid.uuid4()}".encode()


def add_artifact(ctx: Context, job_id: uuid.UUID, data: bytes, kind: str = "config") -> ArtifactRecord:
    """Store ``data`` and record it as an artifact of the job, owned by the job's token."""
    sha256 = ctx.storage.put_bytes(data)
    with transaction(ctx.sessions) as session:
        token_id = session.get_one(JobRecord, job_id).token_id
        row = ArtifactRecord(token_id=token_id, job_id=job_id, kind=kind, name=f"{kind}.bin",
                       media_type="application/octet-stream", sha256=sha256, size=len(data))
        session.add(row)
    return row


def add_profile(ctx: Context, sha256: str) -> None:
    with transaction(ctx.sessions) as session:
        session.add(
            ProfileRecord(
                key=uuid.uuid4().hex,
                sha256=sha256,
                size=1,
                model="factory:tiny-llama",
                metric="output_mse",
                method="rtn",
                units=1,
                formats=["int4_g32"],
                meta={},
            )
        )


def backdate(path: os.PathLike, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_deleting_a_job_removes_the_files_only_its_artifacts_named(api):
    client, ctx = api
    token_id, headers = token(ctx, "owner")
    job_id = finished_job(ctx, token_id)
    config, model = add_artifact(ctx, job_id, unique("config")), add_artifact(ctx, job_id, unique("tar"), kind="model")
    paths = [ctx.storage.path(config.sha256), ctx.storage.path(model.sha256)]
    assert all(path.is_file() for path in paths)
    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    assert not any(path.exists() for path in paths)
    assert client.get(f"/v1/artifacts/{config.id}", headers=headers).status_code == 404


def test_bytes_shared_by_two_jobs_of_two_tokens_stay_until_the_second_is_deleted(api):
    client, ctx = api
    (first_token, first), (second_token, second) = token(ctx, "a"), token(ctx, "b")
    first_job, second_job = finished_job(ctx, first_token), finished_job(ctx, second_token)
    data = unique("shared config")
    add_artifact(ctx, first_job, data)
    kept = add_artifact(ctx, second_job, data)
    path = ctx.storage.path(kept.sha256)
    assert client.delete(f"/v1/jobs/{first_job}", headers=first).status_code == 204
    assert path.is_file()
    download = client.get(f"/v1/artifacts/{kept.id}", headers=second)
    assert download.status_code == 200 and download.content == data
    assert client.delete(f"/v1/jobs/{second_job}", headers=second).status_code == 204
    assert not path.exists()


def test_a_cached_profile_keeps_its_bytes_when_the_job_that_made_it_goes(api):
    client, ctx = api
    token_id, headers = token(ctx, "owner")
    job_id = finished_job(ctx, token_id)
    profile = add_artifact(ctx, job_id, unique("profile npz"), kind="profile")
    add_profile(ctx, profile.sha256)
    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    assert ctx.storage.path(profile.sha256).is_file()


def test_a_refused_or_rolled_back_delete_removes_nothing(api, monkeypatch):
    client, ctx = api
    token_id, headers = token(ctx, "owner")
    running = finished_job(ctx, token_id, state="running")
    artifact = add_artifact(ctx, running, unique("config of a running job"))
    assert client.delete(f"/v1/jobs/{running}", headers=headers).status_code == 409
    assert ctx.storage.path(artifact.sha256).is_file()

    done = finished_job(ctx, token_id)
    artifact = add_artifact(ctx, done, unique("config of a job whose delete fails"))
    real_delete = job_store.delete

    def crash_before_commit(session, job):
        real_delete(session, job)
        raise RuntimeError("the database went away before the commit")

    monkeypatch.setattr(jobs_api.jobs, "delete", crash_before_commit)
    with pytest.raises(RuntimeError, match="went away"):
        client.delete(f"/v1/jobs/{done}", headers=headers)
    with ctx.sessions() as session:
        assert (
            session.scalar(select(func.count()).select_from(ArtifactRecord).where(ArtifactRecord.job_id == done)) == 1
        )
    assert ctx.storage.path(artifact.sha256).is_file()


def test_remove_is_idempotent_and_never_reaches_outside_the_root(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha256 = store.put_bytes(b"once")
    assert store.remove(sha256) is True and not store.path(sha256).exists()
    assert store.remove(sha256) is False
    with pytest.raises(ValueError, match="sha256"):
        store.remove("../../etc/passwd")

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / store.path(sha256).name
    victim.write_bytes(b"not the store's")
    (tmp_path / "blobs" / sha256[:2] / sha256[2:4]).rmdir()
    (tmp_path / "blobs" / sha256[:2] / sha256[2:4]).symlink_to(outside)
    with pytest.raises(ValueError, match="outside the store"):
        store.remove(sha256)
    assert victim.read_bytes() == b"not the store's"
    assert list(store.blobs()) == [] and list(store.temporaries()) == []


def test_storing_bytes_again_renews_their_time_so_a_sweep_leaves_them(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha256 = store.put_bytes(b"old orphan")
    backdate(store.path(sha256), 2 * HOUR)
    assert store.put_bytes(b"old orphan") == sha256
    assert time.time() - store.path(sha256).stat().st_mtime < HOUR


@pytest.fixture
def cli_context(tmp_path, database_url, monkeypatch) -> Iterator[Context]:
    """A context on the settings ``bitalloc`` reads from the environment."""
    monkeypatch.setenv("BITALLOC_DATA_DIR", str(tmp_path / "data"))
    if database_url:
        monkeypatch.setenv("BITALLOC_DATABASE_URL", database_url)
    get_settings.cache_clear()
    ctx = Context.create(get_settings())
    yield ctx
    ctx.close()
    get_settings.cache_clear()


def test_gc_sweeps_old_orphans_and_stale_temporaries_and_a_dry_run_only_lists_them(cli_context):
    ctx, store = cli_context, cli_context.storage
    token_id, _ = token(ctx, "owner")
    named = add_artifact(ctx, finished_job(ctx, token_id), unique("named")).sha256
    profile = store.put_bytes(unique("cached profile"))
    add_profile(ctx, profile)
    orphan, young = store.put_bytes(unique("orphan")), store.put_bytes(unique("young orphan"))
    stale, fresh = store.path(orphan).parent / ".tmp-stale", store.path(orphan).parent / ".tmp-fresh"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    for path in (store.path(named), store.path(profile), store.path(orphan), stale):
        backdate(path, 2 * HOUR)
    runner = CliRunner()

    listed = runner.invoke(cli, ["gc", "--dry-run"])
    assert listed.exit_code == 0, listed.output
    assert f"would remove blob {orphan}" in listed.output and f"would remove temporary file {stale}" in listed.output
    size = store.path(orphan).stat().st_size + len(b"half")
    assert f"would remove 1 orphan blob(s) and 1 temporary file(s), {size} bytes" in listed.output
    assert store.path(orphan).is_file() and stale.is_file()

    swept = runner.invoke(cli, ["gc"])
    assert swept.exit_code == 0, swept.output
    assert "removed 1 orphan blob(s) and 1 temporary file(s)" in swept.output
    assert not store.path(orphan).exists() and not stale.exists()
    assert all(store.path(sha).is_file() for sha in (named, profile, young)) and fresh.is_file()

    swept = runner.invoke(cli, ["gc", "--min-age", "0"])
    assert swept.exit_code == 0 and "removed 1 orphan blob(s) and 1 temporary file(s)" in swept.output
    assert sorted(store.blobs()) == sorted([named, profile]) and list(store.temporaries()) == []
