"""``bitalloc serve / worker / db``: run the API, run queued jobs, migrate the database."""

from __future__ import annotations

import sys

import typer

from bitalloc.service.cli.common import context, fail

db_app = typer.Typer(help="The service database.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Option("head", help="Migrate up to this revision.")) -> None:
    """Apply the database migrations (PostgreSQL or the embedded SQLite file)."""
    from bitalloc.service.db import current_revision, make_engine, upgrade
    from bitalloc.service.settings import get_settings

    engine = make_engine(get_settings().sqlalchemy_url)
    upgrade(engine, revision)
    typer.echo(f"database at revision {current_revision(engine)}")
    engine.dispose()


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="API processes (scaled-out mode only; embedded mode needs one)."),
) -> None:
    """Run the API. With no settings: SQLite and artifacts under ./bitalloc-data, jobs run in-process."""
    import uvicorn

    from bitalloc.service.settings import get_settings

    settings = get_settings()
    if workers > 1 and not settings.redis_url:
        raise fail("--workers > 1 needs BITALLOC_REDIS_URL: embedded jobs run inside the one API process")
    mode = "queue (RQ on Redis)" if settings.redis_url else f"embedded ({settings.worker_threads} worker thread(s))"
    typer.echo(f"bitalloc API on http://{host}:{port}/v1 (docs /v1/docs), {mode}, database "
               f"{'configured' if settings.database_url else settings.sqlalchemy_url}", err=True)
    uvicorn.run("bitalloc.service.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info")


def worker(burst: bool = typer.Option(False, help="Run the queued jobs, then exit."),
           count: int = typer.Option(1, min=1, max=64, help="Worker processes to run side by side (each takes "
                                     "one job at a time; give each a CPU core or a GPU).")) -> None:
    """Take jobs from the RQ queue (needs BITALLOC_REDIS_URL); each job runs in its own work horse."""
    from bitalloc.service.settings import get_settings

    if not get_settings().redis_url:
        raise fail("bitalloc worker needs BITALLOC_REDIS_URL (without it, `bitalloc serve` runs jobs itself)")
    if count == 1:
        one_worker(burst)
        return
    import multiprocessing
    import signal

    spawn = multiprocessing.get_context("spawn")  # fresh processes: no pooled connection crosses a fork
    processes = [spawn.Process(target=one_worker, args=(burst,), name=f"bitalloc-worker-{i}") for i in range(count)]
    for process in processes:
        process.start()
    # A SIGTERM (docker stop, a supervisor) ends the workers too: each finishes or hands back its job.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=30)
    if any(process.exitcode for process in processes):
        raise typer.Exit(1)


def one_worker(burst: bool) -> None:
    from bitalloc.service.worker import run_rq_worker

    ctx = context()
    try:
        run_rq_worker(ctx, burst=burst)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    finally:
        ctx.close()


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.command("serve")(serve)
    app.command("worker")(worker)
