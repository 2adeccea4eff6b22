"""What the dashboard reads besides the front: a job's units laid out for the heatmap, and its baselines.

Both come from the job's stored profile, so they exist exactly when the front does (404/409
as for the front).
"""

from __future__ import annotations

import functools
import uuid

from fastapi import APIRouter, HTTPException, Request, Response, status

from bitalloc.pipeline.baselines import baseline_points
from bitalloc.quant.profile import Profile
from bitalloc.service.api.deps import ContextDep, TokenDep
from bitalloc.service.api.fronts import NOT_MODIFIED, RESPONSES, load_front
from bitalloc.service.api.immutable import etag_of, immutable
from bitalloc.service.context import Context
from bitalloc.service.dashboard.layout import format_bits, unit_rows
from bitalloc.service.schemas import BaselinesOut, UnitsOut

router = APIRouter(prefix="/jobs/{job_id}", tags=["dashboard"])
GONE = {410: {"description": "The job's profile is no longer in storage."}}


@functools.lru_cache(maxsize=8)
def _load(path: str) -> Profile:
    """Profiles are stored by content hash, so a path always holds the same profile and may be cached
    (the page asks for units and baselines of the same job one after the other)."""
    return Profile.load(path)


def profile_sha256(ctx: Context, token_id: int, job_id: uuid.UUID) -> str:
    """The sha256 of the token's job's stored profile (404/409 as for the front)."""
    with ctx.sessions() as session:
        return load_front(session, token_id, job_id)[2].sha256


def stored_profile(ctx: Context, sha256: str) -> Profile:
    try:
        return _load(str(ctx.storage.path(sha256)))
    except FileNotFoundError as exc:
        raise HTTPException(status.HTTP_410_GONE, "the job's profile is no longer in storage") from exc


@router.get("/units", response_model=UnitsOut, responses={**RESPONSES, **GONE, **NOT_MODIFIED})
def read_units(job_id: uuid.UUID, request: Request, ctx: ContextDep, token_id: TokenDep) -> Response:
    """The job's units with their heatmap place (block, column), and each format's bits per weight."""
    sha256 = profile_sha256(ctx, token_id, job_id)

    def render() -> bytes:
        profile = stored_profile(ctx, sha256)
        return UnitsOut.model_validate({"units": unit_rows(profile), "formats": format_bits(profile)}) \
            .model_dump_json().encode()

    return immutable(request, etag_of("units", sha256), render)


@router.get("/baselines", response_model=BaselinesOut, responses={**RESPONSES, **GONE, **NOT_MODIFIED})
def read_baselines(job_id: uuid.UUID, request: Request, ctx: ContextDep, token_id: TokenDep) -> Response:
    """Reference allocations on the job's own profile (uniform: every unit in one format), smallest first."""
    sha256 = profile_sha256(ctx, token_id, job_id)

    def render() -> bytes:
        points = baseline_points(stored_profile(ctx, sha256))
        return BaselinesOut.model_validate({"points": points}).model_dump_json().encode()

    return immutable(request, etag_of("baselines", sha256), render)
