"""The export formats a point's configuration can be downloaded in (``GET /v1/exports``)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from bitalloc.quant.export import list_exporters

router = APIRouter(tags=["exports"])


class ExportOut(BaseModel):
    name: str = Field(description="The `format` of GET /v1/jobs/{id}/points/{point_id}/config.")
    filename: str = Field(description="The file's conventional name (downloads add the job and point to it).")
    media_type: str
    description: str


@router.get("/exports", response_model=list[ExportOut])
def list_exports() -> list[dict[str, str]]:
    """Every export format with what it writes; what each refuses and why is in docs/exports.md."""
    return list_exporters()
