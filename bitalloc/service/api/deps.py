"""What every route needs: the shared context, a database session and the caller's token.

Sessions are opened and closed inside one step (the token lookup; the route's body): FastAPI
runs each sync step on a pool thread, and a SQLite transaction held across steps could block
every pool thread behind one lock.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bitalloc.service.auth import find_token
from bitalloc.service.context import Context

# Integers a request may carry, bounded by what the database holds (a 32-bit id or count), so
# an out-of-range number is a 422 and never a database error.
INT32_MAX = 2**31 - 1
PointId = Annotated[int, Path(ge=1, le=INT32_MAX, description="A point's id from the job's front.")]
LogOffset = Annotated[int, Query(ge=0, le=INT32_MAX, description="Skip the first lines (for polling).")]
ListOffset = Annotated[int, Query(ge=0, le=INT32_MAX, description="Skip the first items.")]

bearer = HTTPBearer(auto_error=False, description="A token from `bitalloc token create --name NAME`.")


def get_context(request: Request) -> Context:
    return request.app.state.ctx


ContextDep = Annotated[Context, Depends(get_context)]


def get_token_id(ctx: ContextDep,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> int:
    """The caller's token id; 401 without a live token."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    with ctx.sessions() as session:
        token = find_token(session, credentials.credentials)
    if token is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return token.id


TokenDep = Annotated[int, Depends(get_token_id)]
