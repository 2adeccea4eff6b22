"""Alembic migrations (``bitalloc db upgrade``; the API and workers apply them at startup)."""
