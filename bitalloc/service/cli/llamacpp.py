"""``bitalloc llamacpp``: build and locate llama.cpp's own tools (llama-quantize, llama-perplexity, llama-imatrix)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from bitalloc.service.cli.common import fail

if TYPE_CHECKING:
    from bitalloc.quant.llamacpp.tools import Tools

llamacpp_app = typer.Typer(help="llama.cpp's tools, built from the pinned llama-cpp-python sdist.", no_args_is_help=True)


@llamacpp_app.command("build")
def llamacpp_build(
    sdist: Path | None = typer.Option(None, help="A local copy of the pinned sdist (sha256-checked) instead of pip's."),
    jobs: int | None = typer.Option(None, min=1, help="Parallel compile jobs (default: the cores this process may use)."),
) -> None:
    """Fetch the pinned llama-cpp-python sdist, check its sha256 and build the tools once into the cache."""
    from bitalloc.quant.llamacpp.tools import LlamaCppError, build

    try:
        found = build(sdist=sdist, jobs=jobs, log=lambda line: typer.echo(line, err=True))
    except LlamaCppError as exc:
        raise fail(str(exc)) from exc
    _print_paths(found)


@llamacpp_app.command("where")
def llamacpp_where() -> None:
    """Print where the built tools, the shared library and the converter are; fail when they are not built."""
    from bitalloc.quant.llamacpp.tools import ToolsNotBuilt, tools

    try:
        found = tools()
    except ToolsNotBuilt as exc:
        raise fail(str(exc)) from exc
    _print_paths(found)


def _print_paths(tools: Tools) -> None:
    for name in ("quantize", "perplexity", "imatrix", "library", "converter"):
        typer.echo(f"{name}: {getattr(tools, name)}")


def register(app: typer.Typer) -> None:
    app.add_typer(llamacpp_app, name="llamacpp")
