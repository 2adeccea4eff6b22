"""The web dashboard: a static page (plain JS modules, no build step, nothing from a CDN) served by the API.

The page talks only to the public ``/v1`` API with the user's bearer token; ``api.router`` adds
the two reads it needs beyond the front (units, baselines). ``mount`` serves the page at
``/dashboard`` (``/`` redirects there) and its files under ``/dashboard/static``. A strict
Content-Security-Policy keeps every script, style and request on this origin, which both
enforces "no CDN" and keeps the token in localStorage away from injected scripts.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")

pages = APIRouter(include_in_schema=False)


@pages.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@pages.get("/dashboard")
def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})


def mount(app: FastAPI) -> None:
    """Serve the page and its static files (the ``/v1`` reads are included with the other API routers)."""
    app.include_router(pages)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
