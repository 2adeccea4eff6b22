"""``bitalloc token``: create, list and revoke API tokens."""

from __future__ import annotations

import typer

from bitalloc.service.cli.common import context, fail

token_app = typer.Typer(help="API tokens (requests send `Authorization: Bearer TOKEN`).", no_args_is_help=True)


@token_app.command("create")
def token_create(name: str = typer.Option(..., help="Who or what the token is for.")) -> None:
    """Create a token; it is printed once (last line) and stored only as its sha256."""
    from bitalloc.service.auth import create_token
    from bitalloc.service.db import transaction

    ctx = context()
    try:
        with transaction(ctx.sessions) as session:
            _, secret = create_token(session, name)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    finally:
        ctx.close()
    typer.echo(f"token {name!r} created; it is shown only now:", err=True)
    typer.echo(secret)


@token_app.command("list")
def token_list() -> None:
    """Tokens by name, with their first characters (never the secret)."""
    from sqlalchemy import select

    from bitalloc.service.models import TokenRecord

    ctx = context()
    with ctx.sessions() as session:
        for token in session.scalars(select(TokenRecord).order_by(TokenRecord.id)):
            state = "revoked" if token.revoked_at else "active"
            typer.echo(f"{token.id}\t{token.name}\t{token.prefix}...\t{state}\t{token.created_at:%Y-%m-%d %H:%M}")
    ctx.close()


@token_app.command("revoke")
def token_revoke(name: str = typer.Option(..., help="Revoke every active token with this name.")) -> None:
    from bitalloc.service.auth import revoke_tokens
    from bitalloc.service.db import transaction

    ctx = context()
    with transaction(ctx.sessions) as session:
        count = revoke_tokens(session, name)
    ctx.close()
    if not count:
        raise fail(f"no active token named {name!r}")
    typer.echo(f"revoked {count} token(s) named {name!r}")


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
