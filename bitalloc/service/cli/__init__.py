"""The ``bitalloc`` command line: one module per command group, gathered on ``app``."""

from __future__ import annotations

import typer

from bitalloc.service.cli import artifact, export, llamacpp, pipeline, server, storage, tokens, zoo

app = typer.Typer(help="bitalloc: mixed-precision bit allocation search.", no_args_is_help=True, add_completion=False)
for group in (zoo, llamacpp, pipeline, server, tokens, artifact, export, storage):
    group.register(app)
