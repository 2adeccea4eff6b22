"""A compressed-tensors checkpoint: the model quantized as an allocation, as a folder vLLM loads.

The folder is a Hugging Face model folder:

* ``config.json`` with the ``quantization_config`` of ``quant.export.compressed_tensors`` (one
  config group per format, exact targets, 16-bit units ignored), written by compressed-tensors'
  own ``ModelCompressor.update_config`` with ``quantization_status: compressed``;
* ``model.safetensors`` (shards of at most ``MAX_SHARD`` and their index when larger; a streamed
  model's, one shard per decoder block, written while the block is read): each
  quantized unit as compressed-tensors' compressors store it, ``pack-quantized`` integers
  (``weight_packed`` int32, ``weight_scale``, ``weight_shape``) and ``naive-quantized`` FP8
  (``weight`` float8_e4m3fn, ``weight_scale``: what compressed-tensors infers for weight-only
  FP8, which vLLM reads as it reads ``float-quantized``); 16-bit units in their dtype; every other
  tensor as the model has it (tied aliases once, as ``save_pretrained`` does);
* the generation config and the tokenizer.

The codes and scales are bitalloc's own: ``quant.quantizers.quantize`` (RTN, or GPTQ on the
calibration Hessians), the very rounding the profile and the simulation use. compressed-tensors
only stores them. Its symmetric integers are signed codes ``c`` with no zero point, worth
``c * s``; bitalloc's codes ``q`` in ``0 .. 2**b - 1`` are worth ``q * s + m`` with
``m = -2**(b-1) * s``, which is ``(q - 2**(b-1)) * s`` exactly (float16 ``s`` times a small
integer is exact in float32). So the compressor is handed bitalloc's dequantized matrix and its
float16 scales and rounds every ``w / s`` back to exactly ``c = q - 2**(b-1)`` (FP8: to the very
e4m3 level). Each unit is then decompressed by compressed-tensors itself and compared with
bitalloc's matrix; a mismatch refuses the build rather than write a checkpoint that computes
something else.

Scales stay bitalloc's float16 values. Loaders put them in the model's dtype: exact in float16
and float32 (transformers on a float32 model; ``vllm serve DIR --dtype float16``), rounded to
bfloat16 otherwise (relative error at most 2**-9). vLLM keeps FP8 scales in float32: exact.

Refused with ``ArtifactError``, every unit and reason at once: what compressed-tensors cannot
express (``quant.export.compressed_tensors``: NF4, FP6, FP4, llama.cpp's types, asymmetric grids,
partial groups, split tie groups, quantized KV caches), and what vLLM has no kernel for (integers other than 4
and 8 bits, groups other than 32, 64, 128 or per channel, grouped FP8, quantized modules that are
not ``nn.Linear`` layers of the blocks). Asymmetric formats are refused, not approximated:
compressed-tensors' zero point is an integer and bitalloc's offset a float16, so the grids
differ; the symmetric format of the same width and group stores exactly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from bitalloc.quant.artifact.build import (
    check_build,
    gptq_hessians,
    resolve_units,
    save_model_files,
    staged_folder,
    streamed_parts,
    unquantized_tensors,
)
from bitalloc.quant.artifact.manifest import ArtifactError
from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.export.base import ExportError, ExportRequest, Problems, format_family
from bitalloc.quant.export.compressed_tensors import build as export_config
from bitalloc.quant.export.compressed_tensors import weight_args
from bitalloc.quant.formats import Format, IntFormat, get_format
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.progress import ProgressFn, no_progress
from bitalloc.quant.quantizers import Method, quantize
from bitalloc.quant.stream import StreamedModel

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme

LAYOUT = "compressed-tensors"
MAX_SHARD = "5GB"  # transformers' default shard size
# What vLLM's compressed-tensors schemes run: WNA16 (Marlin) takes these integer widths and groups
# (None: per channel); FP8 weights (W8A16) are per channel, tensor or block, never in groups.
VLLM_INT_BITS = (4, 8)
VLLM_GROUPS = (None, 32, 64, 128)
# Units the allocation leaves out keep the model's weight; to the config they are unquantized
# (in ``ignore``), as a 16-bit unit is, so a tie group half left out is refused like a split one.
LEFT_OUT = get_format("bf16")
FP8 = "fp8_e4m3"
TAKES = ("A compressed-tensors checkpoint takes int4 and int8 (symmetric: _g32, _g64, _g128 or _pc), fp8_e4m3 "
         "(per channel), bf16 and fp16 for the Linear layers of the blocks, and 16-bit KV caches.")


@dataclass(frozen=True)
class Checkpoint:
    """A compressed-tensors checkpoint on disk: its folder, its ``quantization_config`` and its files' sizes."""

    path: Path
    quantization_config: dict[str, Any]
    files: dict[str, int]

    @property
    def formats(self) -> list[str]:
        """The compressed-tensors formats its config groups use (``pack-quantized``, ``naive-quantized``)."""
        return sorted({group["format"] for group in self.quantization_config["config_groups"].values()})

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    @property
    def summary(self) -> dict[str, Any]:
        """JSON-able record of what was written (``quant.targets.Built.summary``)."""
        return {"layout": LAYOUT, "formats": self.formats, "bytes": self.bytes, "files": self.files}


def write_checkpoint(
    model: LoadedModel,
    allocation: Mapping[str, str],
    out: Path | str,
    *,
    method: Method = "rtn",
    calibration: CalibrationSet | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
) -> Checkpoint:
    """Write ``model`` quantized as ``allocation`` (unit -> format name) to the folder ``out``.

    As ``quant.artifact.build_artifact``: GPTQ (integer units) needs ``calibration``, whose
    Hessians ``hessians`` may already hold. Everything the checkpoint cannot hold is refused
    before any quantization runs; the folder is staged and renamed, so an interrupted build
    leaves nothing behind.
    """
    out = check_build(method, calibration, out, overwrite)
    if not (hasattr(model.module, "config") and hasattr(model.module, "save_pretrained")):
        raise ArtifactError(f"{model.spec}: a compressed-tensors checkpoint is a Hugging Face model folder, "
                            "so the model must be a transformers model")
    units, kv_cache = resolve_units(model, allocation)
    config = _quantization_config(model, units, kv_cache)
    rest, _ = unquantized_tensors(model.module, {f"{name}.weight" for name in units})
    part = functools.partial(_tensors, _schemes(config))
    if isinstance(model, StreamedModel):
        parts: Iterable[dict[str, torch.Tensor]] = streamed_parts(model, units, rest, method, calibration, progress, part)
        path, files = _write(out, parts, model, config, len(model.blocks) + 1)
    else:
        hessians = gptq_hessians(model, units, method, calibration, hessians, progress)
        path, files = _write(out, [part(units, rest, method, hessians, progress)], model, config)
    return Checkpoint(path, config, files)


def _tensors(schemes: Mapping[str, QuantizationScheme], units: Mapping[str, tuple[nn.Module, Format]],
             rest: Mapping[str, torch.Tensor], method: Method, hessians: Mapping[str, torch.Tensor],
             progress: ProgressFn, done: int = 0, total: int | None = None) -> dict[str, torch.Tensor]:
    """``units`` as compressed-tensors stores them (16-bit ones in their dtype), with the
    unquantized tensors ``rest``: one weights file's tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for count, (name, (module, fmt)) in enumerate(units.items(), done + 1):
        weight = module.weight.detach()
        if fmt.is_keep:
            tensors[f"{name}.weight"] = weight.to(fmt.dtype)
        else:
            stored = _compressed(name, weight, fmt, schemes[name], method, hessians.get(name))
            tensors.update({f"{name}.{suffix}": t for suffix, t in stored.items()})
        progress(count, total or len(units), "quantize")
    return {name: t.detach().cpu().contiguous() for name, t in {**tensors, **rest}.items()}


def _quantization_config(model: LoadedModel, units: Mapping[str, tuple[nn.Module, Format]],
                         kv_cache: Mapping[str, str]) -> dict[str, Any]:
    """The export's ``quantization_config`` for the allocation, once vLLM can run every unit of it."""
    found = model.units(kv_cache=bool(kv_cache))
    block_units = {unit.name for unit in found.weights}
    formats = {name: units[name][1] if name in units else LEFT_OUT for name in block_units}
    formats.update({name: get_format(format_name) for name, format_name in kv_cache.items()})
    request = ExportRequest(tuple(u for u in found.units if u.name in formats), formats,
                            tuple(tuple(group) for group in found.tie_groups))
    messages = []
    try:
        config = json.loads(export_config(request))
    except ExportError as exc:
        messages.append(str(exc))
    problems = Problems("a compressed-tensors checkpoint for vLLM")
    for name, (module, fmt) in units.items():
        reason = _vllm_refusal(fmt, module, name in block_units)
        if reason:
            problems.add(reason, name)
    try:
        problems.raise_if_any()
    except ExportError as exc:
        messages.append(str(exc))
    if messages:
        raise ArtifactError("\n".join([*messages, TAKES]))
    config["quantization_status"] = "compressed"
    return config


def _schemes(config: dict[str, Any]) -> dict[str, QuantizationScheme]:
    """Each target's ``QuantizationScheme``, parsed by compressed-tensors (every target is one exact unit name)."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = QuantizationConfig.model_validate(config).config_groups.values()
    return {target: scheme for scheme in groups for target in scheme.targets}


def _vllm_refusal(fmt: Format, module: nn.Module, in_blocks: bool) -> str | None:
    """Why vLLM cannot run ``module`` quantized as ``fmt``: None when it can, or when the export says why not."""
    if fmt.is_keep:
        return None
    if not in_blocks:
        return (f"{fmt.name}: vLLM quantizes the Linear layers of the blocks only (it runs the embeddings and the "
                "output head unquantized); keep this unit in bf16 or leave it out")
    if type(module) is not nn.Linear:
        return f"{fmt.name}: compressed-tensors compresses nn.Linear layers, and this is a {type(module).__name__}"
    if isinstance(fmt, IntFormat):
        if not fmt.symmetric:
            symmetric = IntFormat(fmt.bits, fmt.group_size).name
            return f"{fmt.name}: take {symmetric} instead, the symmetric grid of the same width and group, stored exactly"
        if fmt.bits not in VLLM_INT_BITS:
            return f"{fmt.name}: vLLM's integer weight kernels (WNA16) take 4 or 8 bits"
        if fmt.group_size not in VLLM_GROUPS:
            return f"{fmt.name}: vLLM's integer weight kernels (Marlin) take groups of 32, 64 or 128, or per channel (_pc)"
        return None
    if format_family(fmt) == FP8:
        return None if fmt.name == FP8 else f"{fmt.name}: vLLM runs FP8 weights with one scale per channel ({FP8}), not per group"
    if isinstance(weight_args(fmt), str):
        return None  # NF4, FP6, FP4: the export's message says why
    return f"{fmt.name}: no compressed-tensors layout holds this format's codes"


def _compressed(name: str, weight: torch.Tensor, fmt: Format, scheme: QuantizationScheme, method: Method,
                hessian: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One unit's tensors as compressed-tensors stores them, holding bitalloc's codes and float16 scales."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat

    q = quantize(weight.float(), fmt, method, hessian)
    dense = q.dequantize()
    compressor = BaseCompressor.get_value_from_registry(CompressionFormat(scheme.format).value)
    stored = compressor.compress({"weight": dense, "weight_scale": q.scales}, scheme)
    # Decompressed in float32 (the stored scales widened, exactly), the codes must give bitalloc's matrix back.
    back = compressor.decompress({**stored, "weight_scale": q.scales.float()}, scheme)["weight"]
    if not torch.equal(back, dense):
        worst = float((back - dense).abs().max())
        raise ArtifactError(f"{name} ({fmt.name}): compressed-tensors stores other values than bitalloc's "
                            f"(largest difference {worst:.3g}); this compressed-tensors version maps the grid differently")
    return stored


def _write(out: Path, parts: Iterable[dict[str, torch.Tensor]], model: LoadedModel, config: dict[str, Any],
           count: int | None = None) -> tuple[Path, dict[str, int]]:
    """Stage the folder (shards, config with its quantization_config, tokenizer), then rename it
    into place. One part (a model held whole) is split into shards of ``MAX_SHARD``; ``count``
    parts (a streamed model's, one per block and one for what lies outside) are a shard each,
    written as they come."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from huggingface_hub import split_torch_state_dict_into_shards

    with staged_folder(out) as staging:
        save_model_files(model, staging)
        ModelCompressor(quantization_config=QuantizationConfig.model_validate(config)).update_config(str(staging))
        # safetensors writes owner-only files; a runtime serving as another user must read them like the config
        mode = (staging / "config.json").stat().st_mode & 0o777
        weight_map: dict[str, str] = {}
        total = 0
        for index, tensors in enumerate(parts):
            if count is None:
                split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
                shards = split.filename_to_tensors if split.is_sharded else {"model.safetensors": list(tensors)}
            else:
                shards = {f"model-{index + 1:05d}-of-{count:05d}.safetensors": list(tensors)}
            for filename, names in shards.items():
                save_file({name: tensors[name] for name in names}, staging / filename, metadata={"format": "pt"})
                (staging / filename).chmod(mode)
                weight_map |= dict.fromkeys(names, filename)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    return out, files
