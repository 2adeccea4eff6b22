"""Build targets: what ``bitalloc build`` writes for an allocation, one per runtime.

- ``bitalloc``: the packed, verifiable artifact that runs on bitalloc's Triton kernels
  (``quant.artifact``);
- ``gguf``: a GGUF made by llama.cpp's own converter and ``llama-quantize``, every tensor's
  type checked (``quant.targets.gguf_file``);
- ``compressed-tensors``: a packed checkpoint that vLLM loads, holding bitalloc's own codes
  (``quant.artifact.compressed_tensors``).

Every target writes one folder (staged, then renamed into place) and says in ``Built.summary``
what it holds; the service packs that folder into one tar whatever the target. The builders are
imported when used, so the REST schema and the CLI can name the targets without loading them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from bitalloc.quant.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from bitalloc.quant.calibration import CalibrationSet
    from bitalloc.quant.loading import LoadedModel
    from bitalloc.quant.quantizers import Method

TargetName = Literal["bitalloc", "gguf", "compressed-tensors"]
TARGETS: tuple[str, ...] = get_args(TargetName)


@dataclass(frozen=True)
class Built:
    """A target written to disk: its folder and a JSON-able summary (layout, bytes) to record with it."""

    path: Path
    summary: dict


@dataclass(frozen=True)
class BuildRequest:
    """What every target is given: the model, the allocation (unit -> format name) and how to quantize."""

    model: "LoadedModel"
    allocation: Mapping[str, str]
    out: Path
    method: "Method" = "rtn"
    calibration: "CalibrationSet | None" = None
    overwrite: bool = False
    progress: ProgressFn = no_progress


def _bitalloc(request: BuildRequest) -> Built:
    from bitalloc.quant.artifact import build_artifact

    artifact = build_artifact(request.model, request.allocation, request.out, method=request.method,
                              calibration=request.calibration, overwrite=request.overwrite, progress=request.progress)
    manifest = artifact.manifest
    return Built(artifact.path, {"layout": manifest["layout"], "bytes": manifest["bytes"]})


def _gguf(request: BuildRequest) -> Built:
    from bitalloc.quant.targets.gguf_file import build_gguf

    return build_gguf(request)


def _compressed_tensors(request: BuildRequest) -> Built:
    from bitalloc.quant.artifact import write_checkpoint

    checkpoint = write_checkpoint(request.model, request.allocation, request.out, method=request.method,
                                  calibration=request.calibration, overwrite=request.overwrite,
                                  progress=request.progress)
    return Built(checkpoint.path, checkpoint.summary)


_BUILDERS: dict[str, Callable[[BuildRequest], Built]] = {"bitalloc": _bitalloc, "gguf": _gguf,
                                                        "compressed-tensors": _compressed_tensors}


def build_target(target: str, request: BuildRequest) -> Built:
    """Write ``request``'s model, quantized as its allocation, in the form ``target`` names."""
    from bitalloc.quant.artifact import ArtifactError

    if target not in _BUILDERS:
        raise ArtifactError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    return _BUILDERS[target](request)
