"""Alembic environment: runs on the connection ``service.db.upgrade`` hands in, or, from the
``alembic`` command line, on the database the settings name (``BITALLOC_DATABASE_URL``)."""

from __future__ import annotations

from alembic import context

from bitalloc.service.models import Base


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    from bitalloc.service.db import make_engine
    from bitalloc.service.settings import get_settings

    engine = make_engine(get_settings().sqlalchemy_url)
    with engine.begin() as connection:
        _migrate(connection)
    engine.dispose()


def _migrate(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds tables instead.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run `bitalloc db upgrade`")
run()
