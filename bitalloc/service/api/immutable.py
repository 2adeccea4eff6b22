"""Answers that never change once written: a job's stored front, its points, its units and
baselines, and its configurations.

A front is written once, in the transaction that marks its job succeeded, and only ever deleted
with the job, so whatever identifies it (the job's UUID, the front's row, the profile's sha256)
identifies its bytes. Such an answer carries an ``ETag`` built from that identity: a client that
sends it back in ``If-None-Match`` gets a bodiless 304, and a body is rendered once per process
and served from memory afterwards. The caller's token is still checked on every request (the
route looks the job up for that token first), so a cached body never reaches another token.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from fastapi import Request, Response, status

CACHE_CONTROL = "private, no-cache"  # keep it, but ask again (a 304) before using it
MAX_BODIES = 512


def etag_of(*identity: object) -> str:
    """A strong ETag for the content these identify."""
    return '"' + hashlib.sha256("/".join(map(str, identity)).encode()).hexdigest()[:32] + '"'


def matches(request: Request, etag: str) -> bool:
    """Whether ``If-None-Match`` names this ETag (or ``*``)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


class RenderedBodies:
    """The most recently used rendered bodies, by ETag (thread-safe: routes run on a pool)."""

    def __init__(self, capacity: int = MAX_BODIES) -> None:
        self.capacity = capacity
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, etag: str, render: Callable[[], bytes]) -> bytes:
        with self._lock:
            if etag in self._bodies:
                self._bodies.move_to_end(etag)
                return self._bodies[etag]
        body = render()  # outside the lock: two threads may render one body, never block each other
        with self._lock:
            self._bodies[etag] = body
            while len(self._bodies) > self.capacity:
                self._bodies.popitem(last=False)
        return body


BODIES = RenderedBodies()


def immutable(request: Request, etag: str, render: Callable[[], bytes], media_type: str = "application/json",
              headers: dict[str, str] | None = None) -> Response:
    """304 when the client holds this ETag, else the body (rendered once) with its ETag."""
    sent = {"ETag": etag, "Cache-Control": CACHE_CONTROL, **(headers or {})}
    if matches(request, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=sent)
    return Response(BODIES.get(etag, render), media_type=media_type, headers=sent)
