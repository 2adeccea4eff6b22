"""``bitalloc gc``: remove the artifact store's orphans."""

from __future__ import annotations

import typer

from bitalloc.service.cli.common import context


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    min_age: float = typer.Option(3600.0, min=0, help="Seconds a file must be untouched before it counts as an orphan "
                                                      "(a younger one may belong to a write not yet committed)."),
) -> None:
    """Remove stored files no artifact or profile row names (left by a crash, or by versions that
    kept every file), and temporary files of interrupted writes. Deleting a job removes its own."""
    from bitalloc.service.garbage import sweep

    ctx = context()
    try:
        swept = sweep(ctx.sessions, ctx.storage, min_age=min_age, dry_run=dry_run)
    finally:
        ctx.close()
    verb = "would remove" if dry_run else "removed"
    for sha256, size in swept.blobs.items():
        typer.echo(f"{verb} blob {sha256} ({size} bytes)")
    for path, size in swept.temporaries.items():
        typer.echo(f"{verb} temporary file {path} ({size} bytes)")
    typer.echo(f"{verb} {len(swept.blobs)} orphan blob(s) and {len(swept.temporaries)} temporary file(s), "
               f"{swept.bytes} bytes")


def register(app: typer.Typer) -> None:
    app.command("gc")(gc)
