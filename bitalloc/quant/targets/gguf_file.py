"""A GGUF that llama.cpp made itself, for an allocation (``bitalloc build --target gguf``).

Three steps, each llama.cpp's own tool, so the file is what a llama.cpp user would have made by
hand: ``convert_hf_to_gguf.py`` writes the model at 16 bits, ``llama-quantize`` runs the
allocation's ``--tensor-type`` rules (the very script that the ``llama.cpp`` export writes, so
the two never disagree), and the result is read back with ``gguf`` and refused unless every
tensor holds the type the allocation says (after llama.cpp's documented fallbacks for short
rows). llama-quantize rounds with ggml's own quantizers; with method ``gptq`` it is given the
importance matrix of the job's calibration set (``--imatrix``, through the script's
``LLAMA_IMATRIX``), written from the same Hessians the simulation weighs ggml's rounding by, so
the file holds the blocks the profile simulated. The imatrix is kept beside the GGUF.

The model is converted from its own folder when it has one (a local transformers folder, a zoo
model, or a streamed model's checkpoint, which the converter reads tensor by tensor); otherwise
the loaded module is saved to a temporary folder first. A streamed model's imatrix is summed
block by block, so the build never holds the model whole. KV-cache units
are runtime settings in llama.cpp (``--cache-type-k/-v``): the script that ran says them.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys

from bitalloc.quant.artifact import ArtifactError
from bitalloc.quant.artifact.build import check_build, staged_folder
from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.checksum import file_sha256
from bitalloc.quant.export import llama_cpp
from bitalloc.quant.export.base import ExportError, Problems, make_request
from bitalloc.quant.gguf_names import gguf_name
from bitalloc.quant.hessian import BlockHessians, HessianWalk, calibration_hessians
from bitalloc.quant.llamacpp.imatrix import write_imatrix
from bitalloc.quant.llamacpp.tools import Tools, tools
from bitalloc.quant.loading import LoadedModel, model_folder
from bitalloc.quant.progress import ProgressFn
from bitalloc.quant.stream import StreamedModel
from bitalloc.quant.targets import BuildRequest, Built
from bitalloc.quant.units import UnitSet, kv_units, weight_units

GGUF = "model.gguf"
SCRIPT = "llama-quantize.sh"
SUMMARY = "bitalloc_gguf.json"
IMATRIX = "imatrix.gguf"
LAYOUT = "gguf"


def build_gguf(request: BuildRequest) -> Built:
    """Convert, quantize with the allocation's types, check every tensor, and move the folder into place."""
    out = check_build(request.method, request.calibration, request.out, request.overwrite)
    built = tools()
    lines, script = _script(request)
    with staged_folder(out) as staging, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        work = Path(tmp)
        request.progress(0, 3, "convert")
        base = work / "model-f16.gguf"
        convert_to_gguf(built, request.model, work, base)
        request.progress(1, 3, "llama-quantize")
        (staging / SCRIPT).write_bytes(script)
        imatrix = _imatrix(request, base, staging / IMATRIX) if request.method == "gptq" else None
        _quantize(built, staging / SCRIPT, base, staging / GGUF, imatrix)
        request.progress(2, 3, "check")
        types = _check_types(staging / GGUF, lines)
        size = (staging / GGUF).stat().st_size
        summary = {"layout": LAYOUT, "file": GGUF, "sha256": file_sha256(staging / GGUF),
                   "bytes": {"file": size, "tensors": sum(line.nbytes for line in lines)},
                   "llama_cpp": built.manifest()["version"], "types": types, "method": request.method,
                   "imatrix": IMATRIX if imatrix else None,
                   "calibration": request.calibration.describe() if imatrix else None}
        (staging / SUMMARY).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    request.progress(3, 3, "check")
    return Built(out, {key: summary[key] for key in ("layout", "file", "sha256", "bytes", "llama_cpp")})


def _script(request: BuildRequest) -> tuple[list[llama_cpp.Line], bytes]:
    """The llama.cpp export's ``llama-quantize`` script for the allocation's weight units, and its lines."""
    module = request.model.module
    weights = _weight_allocation(request)
    units = weight_units(module, include=sorted(weights), exclude=())
    try:
        export = make_request(weights, units, (), {"model": request.model.spec}, None)
        problems = Problems(llama_cpp.TARGET)
        lines = llama_cpp.tensor_lines(export, problems)
        problems.raise_if_any()
        return lines, llama_cpp.build(export)
    except (ExportError, ValueError) as exc:
        raise ArtifactError(f"gguf: {exc}") from exc


def _weight_allocation(request: BuildRequest) -> dict[str, str]:
    """The allocation's weight units (its KV-cache units are runtime settings)."""
    kv_names = {unit.name for unit in kv_units(request.model.module)}
    return {name: fmt for name, fmt in request.allocation.items() if name not in kv_names}


def convert_to_gguf(built: Tools, model: LoadedModel, work: Path, outfile: Path) -> None:
    """``convert_hf_to_gguf.py`` to a 16-bit GGUF, on the model's own folder (a streamed model's
    checkpoint: the converter reads it tensor by tensor), or on the loaded module saved to one
    under ``work``."""
    folder = model.checkpoint.folder if isinstance(model, StreamedModel) else model_folder(model.spec)
    if folder is None:
        if not hasattr(model.module, "save_pretrained") or model.tokenizer is None:
            raise ArtifactError(f"{model.spec}: a GGUF is made from a transformers causal LM with a tokenizer")
        folder = work / "hf"
        model.module.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
    _run(built.convert_command(folder, outfile, "f16"), "convert_hf_to_gguf.py")


def _imatrix(request: BuildRequest, base: Path, path: Path) -> Path:
    """llama.cpp's importance matrix of the allocated tensors, from their calibration Hessians
    (summed block by block for a streamed model: only their diagonals outlive their block)."""
    model, calibration = request.model, request.calibration
    tensors = {name: f"{gguf_name(name)}.weight" for name in _weight_allocation(request)}
    units = model.units(include=sorted(tensors), exclude=())
    if isinstance(model, StreamedModel):
        diagonals, tokens = _streamed_diagonals(model, units, calibration, request.progress)
    else:
        hessians = calibration_hessians(model.module, units, calibration, progress=request.progress)
        diagonals, tokens = {name: torch.diagonal(h) for name, h in hessians.items()}, hessians.tokens
    arch = GGUFReader(base).fields[Keys.General.ARCHITECTURE].contents()
    windows = calibration.inputs.shape
    try:
        write_imatrix(path, diagonals, tokens, tensors, arch=arch, dataset=calibration.source, chunks=windows[0],
                      chunk_size=windows[1] if calibration.tokens else 1)
    except ValueError as exc:
        raise ArtifactError(f"gguf: {exc}") from exc
    return path


def _streamed_diagonals(model: StreamedModel, units: UnitSet, calibration: CalibrationSet,
                        progress: ProgressFn) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonals of the units' calibration Hessians, the calibration walking the blocks one
    at a time, and the token count they sum over."""
    walk = HessianWalk(model, BlockHessians(units, calibration))
    diagonals: dict[str, torch.Tensor] = {}
    for index in range(len(model.blocks)):
        with model.materialized(index) as block:
            diagonals |= {name: torch.diagonal(h).clone() for name, h in walk.step(index, block).items()}
        progress(index + 1, len(model.blocks), "imatrix")
    outside = [u.name for u in units.weights if u.name not in diagonals]
    if outside:
        raise ArtifactError(f"gguf: {outside[0]} lies outside the decoder blocks, and a streamed model's "
                            "importance matrix is summed block by block: leave it 16-bit")
    return diagonals, calibration.samples


def _quantize(built: Tools, script: Path, base: Path, outfile: Path, imatrix: Path | None) -> None:
    threads = str(len(os.sched_getaffinity(0)))
    env = {"LLAMA_QUANTIZE": str(built.quantize), "LLAMA_IMATRIX": str(imatrix) if imatrix else ""}
    _run(["sh", str(script), str(base), str(outfile), threads], "llama-quantize", env=env)


def _run(command: list[str], step: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise ArtifactError(f"{step} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-2000:]}")


def _check_types(path: Path, lines: list[llama_cpp.Line]) -> dict[str, str]:
    """Every tensor's ggml type in the file; refused unless each allocated tensor has the type it should."""
    stored = {tensor.name: GGMLQuantizationType(tensor.tensor_type).name for tensor in GGUFReader(path).tensors}
    wrong = []
    for line in lines:
        name = f"{line.tensor}.weight"
        if stored.get(name) != line.qtype.name:
            wrong.append(f"{name}: {stored.get(name, 'missing')}, not {line.qtype.name}")
    if wrong:
        raise ArtifactError(f"llama-quantize did not write the allocation's types ({len(wrong)} tensors): "
                            + "; ".join(wrong[:5]))
    return stored
