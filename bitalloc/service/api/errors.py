"""How the API answers bad requests: bounded, JSON-safe and never a 500.

A 422 lists each error's ``type``, ``loc`` (the field) and ``msg`` (the reason in words), and at
most a short excerpt of the offending input: a 50 MB body is not echoed back, and a
non-finite number or a lone surrogate in the input cannot break the JSON of the answer. A
body over ``max_request_bytes`` is refused with a 413 before it is parsed.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXCERPT_CHARS = 80
AUTHENTICATED = {401: {"description": "No bearer token, or not a live one."},
                 413: {"description": "The request body is over the server's limit."}}
"""What every route behind a token can also answer (documented in the OpenAPI schema)."""


def safe_text(value: Any) -> str:
    """``value`` as text that encodes as UTF-8 (a lone surrogate becomes its escape)."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def excerpt(value: Any) -> Any:
    """The input as a 422 echoes it: small numbers and booleans as they are, anything else as
    at most ``EXCERPT_CHARS`` characters of safe text."""
    if value is None or isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**53):
        return value
    text = safe_text(value if isinstance(value, str) else repr(value))
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = [{"type": e.get("type", "value_error"),
               "loc": [safe_text(part) if isinstance(part, str) else part for part in e.get("loc", ())],
               "msg": safe_text(e.get("msg", "")), "input": excerpt(e.get("input"))} for e in exc.errors()]
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": detail})


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with a 413, by its
    Content-Length when it declares one, else by reading it (at most ``max_bytes``) before the
    app sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > self.max_bytes:
                await self.refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self.refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(status_code=status.HTTP_413_CONTENT_TOO_LARGE,
                                content={"detail": f"request body over {self.max_bytes} bytes"})
        await response(scope, receive, send)
