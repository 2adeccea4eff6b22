"""Build an artifact: quantize every unit of an allocation, pack it, write it with its manifest.

The artifact is self-contained: besides the units it stores every other tensor of the model
as it is (embeddings, norms, biases, unallocated units, in their dtype) and what is needed to
rebuild the module (a transformers config, generation config and tokenizer, or a registered
architecture's name and arguments). It is written to a staging folder and renamed into
place, so an interrupted build never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from bitalloc.quant.artifact.manifest import (
    LAYOUT,
    MANIFEST,
    WEIGHTS,
    Artifact,
    ArtifactError,
    dtype_name,
    tensor_sha256,
)
from bitalloc.quant.artifact.storage import encode, runs_as, storage_of
from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.checksum import file_sha256
from bitalloc.quant.formats import Format, GgmlFormat, get_format
from bitalloc.quant.hessian import BlockHessians, HessianWalk, calibration_hessians
from bitalloc.quant.loading import MODULE_MANIFEST, LoadedModel
from bitalloc.quant.progress import ProgressFn, no_progress
from bitalloc.quant.quantizers import METHODS, Method, uses_gptq
from bitalloc.quant.stream import StreamedModel
from bitalloc.quant.units import is_quantizable, kv_units, weight_matrix


def build_artifact(
    model: LoadedModel,
    allocation: Mapping[str, str],
    out: Path | str,
    *,
    method: Method = "rtn",
    calibration: CalibrationSet | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
) -> Artifact:
    """Write ``model`` quantized as ``allocation`` (unit -> format name) to the folder ``out``.

    GPTQ (``method="gptq"``, integer formats; the others are rounded to nearest) needs the
    ``calibration`` set, whose hash the manifest records; ``hessians`` already collected from
    it save a pass over the data. KV-cache units in the allocation are runtime settings: the
    manifest records them, no tensor stores them.
    """
    out = check_build(method, calibration, out, overwrite)
    units, kv_cache = resolve_units(model, allocation)
    source = _model_record(model)
    rest, tied = unquantized_tensors(model.module, {f"{name}.weight" for name in units})
    streamed = isinstance(model, StreamedModel)
    if not streamed:
        hessians = gptq_hessians(model, units, method, calibration, hessians, progress)
    parts = (streamed_parts(model, units, rest, method, calibration, progress) if streamed
             else [_part(units, rest, method, hessians, progress)])

    records: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    rest_bytes = 0
    with staged_folder(out) as staging:
        files = []
        for index, (part, part_records, part_rest) in enumerate(parts):
            files.append(WEIGHTS if not streamed else f"weights-{index:05d}.safetensors")
            save_file(part, staging / files[-1], metadata={"layout": LAYOUT})
            tensors.update({name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t),
                                   "file": files[-1]} for name, t in part.items()})
            records.update(part_records)
            rest_bytes += part_rest
        unit_bytes = sum(record["bytes"] for record in records.values())
        manifest = {
            "layout": LAYOUT,
            "bitalloc_version": importlib.metadata.version("bitalloc"),
            "model": source,
            "method": method,
            "calibration": calibration.describe() if method == "gptq" else None,
            "allocation": {**{name: fmt.name for name, (_, fmt) in units.items()}, **kv_cache},
            "units": records,
            "weights": files,
            "tensors": dict(sorted(tensors.items())),
            "tied": tied,
            "bytes": {"predicted": unit_bytes + rest_bytes, "units": unit_bytes, "unquantized": rest_bytes},
        }
        _write_beside(staging, model, manifest)
    return Artifact(out, manifest)


Part = tuple[dict[str, torch.Tensor], dict[str, dict], int]
"""One weights file's tensors, the records of the units it holds, and its unquantized bytes."""
P = TypeVar("P")


def _part(units: dict[str, tuple[nn.Module, Format]], rest: dict[str, torch.Tensor], method: Method,
          hessians: Mapping[str, torch.Tensor], progress: ProgressFn, done: int = 0, total: int | None = None) -> Part:
    """``units`` quantized and packed, with the unquantized tensors ``rest``."""
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    for count, (name, (module, fmt)) in enumerate(units.items(), done + 1):
        stored = encode(weight_matrix(module).detach(), fmt, method, hessians.get(name))
        tensors.update({f"{name}.{suffix}": t for suffix, t in stored.items()})
        records[name] = _unit_record(fmt, module, method, [f"{name}.{suffix}" for suffix in stored])
        progress(count, total or len(units), "quantize")
    part = {name: t.detach().cpu().contiguous() for name, t in {**tensors, **rest}.items()}
    return part, records, sum(t.numel() * t.element_size() for t in rest.values())


def streamed_parts(model: StreamedModel, units: dict[str, tuple[nn.Module, Format]], rest: dict[str, torch.Tensor],
                   method: Method, calibration: CalibrationSet | None, progress: ProgressFn,
                   part: Callable[..., P] = _part) -> Iterator[P]:
    """A streamed model's weights file by file: what lies outside the blocks first, then each block
    read from the checkpoint, its units quantized (GPTQ's Hessians summed from the calibration
    batches walking through the unquantized blocks) and written before the next is read. ``part``
    turns each file's units and unquantized tensors into what the target writes (``_part``'s
    arguments; bitalloc's packed weights by default)."""
    prefixes = [model.block_prefix(i) for i in range(len(model.blocks))]
    outside_units = {n: u for n, u in units.items() if not n.startswith(tuple(prefixes))}
    yield part(outside_units, {n: t for n, t in rest.items() if not n.startswith(tuple(prefixes))}, method, {},
               progress, 0, len(units))
    walk = None
    if calibration is not None and any(uses_gptq(fmt, method) for _, fmt in units.values()):
        walk = HessianWalk(model, BlockHessians(model.units(), calibration))
    done = len(outside_units)
    for index, prefix in enumerate(prefixes):
        with model.materialized(index) as block:
            hessians = walk.step(index, block) if walk is not None else {}
            block_units = {n: u for n, u in units.items() if n.startswith(prefix)}
            block_rest = {f"{prefix}{n}": t for n, t in block.state_dict(keep_vars=True).items()
                          if f"{prefix}{n}" in rest}
            yield part(block_units, block_rest, method, hessians, progress, done, len(units))
            done += len(block_units)


def check_build(method: Method, calibration: CalibrationSet | None, out: Path | str, overwrite: bool) -> Path:
    """What every build refuses before it reads a weight: an unknown method, GPTQ without
    calibration data, an output folder that holds something (unless overwriting). Returns ``out``."""
    if method not in METHODS:
        raise ArtifactError(f"method: {method!r} is not one of {METHODS}")
    if method == "gptq" and calibration is None:
        raise ArtifactError("method gptq: GPTQ needs calibration data (a CalibrationSet) to fit each layer")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ArtifactError(f"{out} already exists and is not an empty folder; choose another or allow overwriting")
    return out


def resolve_units(model: LoadedModel, allocation: Mapping[str, str]) -> tuple[dict[str, tuple[nn.Module, Format]], dict[str, str]]:
    """The weight units (name -> module, format) and KV-cache entries an allocation names, checked."""
    modules = dict(model.module.named_modules())
    kv_names = {u.name for u in kv_units(model.module)}
    units: dict[str, tuple[nn.Module, Format]] = {}
    kv_cache: dict[str, str] = {}
    for name, format_name in allocation.items():
        if not isinstance(format_name, str):
            raise ArtifactError(f"allocation: unit {name!r}: format must be a name such as 'int4_g128', got {format_name!r}")
        try:
            fmt = get_format(format_name)
        except ValueError as exc:
            raise ArtifactError(f"allocation: unit {name!r}: {exc}") from None
        if isinstance(fmt, GgmlFormat):
            raise ArtifactError(f"allocation: unit {name!r}: {fmt.name} is a llama.cpp (ggml) type, which only a "
                                f"GGUF holds; build one with llama-quantize instead (--target gguf)")
        if name in kv_names:
            kv_cache[name] = fmt.name
        elif name in modules and is_quantizable(modules[name]):
            units[name] = (modules[name], fmt)
        else:
            known = [n for n, m in modules.items() if is_quantizable(m)][:2] + sorted(kv_names)[:1]
            raise ArtifactError(f"allocation names unit {name!r}, which {model.spec} does not have "
                                f"(its units are its Linear/Conv modules and KV caches, e.g. {', '.join(known)})")
    return units, kv_cache


def gptq_hessians(model: LoadedModel, units: dict[str, tuple[nn.Module, Format]], method: Method,
                  calibration: CalibrationSet | None, given: Mapping[str, torch.Tensor] | None,
                  progress: ProgressFn) -> Mapping[str, torch.Tensor]:
    """Calibration Hessians of the units GPTQ applies to (collected here unless given)."""
    wanted = [name for name, (_, fmt) in units.items() if uses_gptq(fmt, method)]
    if not wanted or calibration is None:
        return {}
    if given is not None:
        missing = [name for name in wanted if name not in given]
        if missing:
            raise ArtifactError(f"hessians: none given for {len(missing)} GPTQ unit(s), e.g. {missing[0]!r}")
        return given
    unit_set = model.units(include=wanted, exclude=())
    return calibration_hessians(model.module, unit_set, calibration, progress=progress)


def _unit_record(fmt: Format, module: nn.Module, method: Method, tensors: list[str]) -> dict:
    n, k = weight_matrix(module).shape
    return {"format": fmt.name, "storage": storage_of(fmt), "shape": [n, k], "group_size": fmt.group_size,
            "method": "gptq" if uses_gptq(fmt, method) else ("keep" if fmt.is_keep else "rtn"),
            "bytes": fmt.nbytes((n, k)), "runs_as": runs_as(fmt, module), "tensors": tensors}


def unquantized_tensors(module: nn.Module, unit_weights: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every other state-dict tensor, stored once; ``tied`` maps each alias to the stored name.

    A unit whose weight is tied to another tensor (an lm_head sharing the embeddings) is
    refused: quantizing it would change the other tensor too, which no format accounts for.
    """
    rest: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owner_of: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        owner = owner_of.setdefault(id(tensor), name)
        if owner != name:
            if {owner, name} & unit_weights:
                raise ArtifactError(f"allocation: {owner!r} and {name!r} are one tied tensor; quantizing it as a unit "
                                    "would change both, so leave that unit out of the allocation")
            tied[name] = owner
        elif name not in unit_weights:
            rest[name] = tensor
    return rest, tied


def _model_record(model: LoadedModel) -> dict:
    """What rebuilds the module: a transformers config (saved beside), or a registered architecture."""
    dtype = next((p.dtype for p in model.module.parameters() if p.is_floating_point()), torch.float32)
    record = {"spec": model.spec, "architecture": model.info.get("architecture", type(model.module).__name__),
              "dtype": dtype_name(dtype)}
    if hasattr(model.module, "config") and hasattr(model.module, "save_pretrained"):
        return {**record, "kind": "transformers"}
    source = _module_dir(model.spec) / MODULE_MANIFEST
    if not source.is_file():
        raise ArtifactError(f"{model.spec}: cannot record how to rebuild this module: artifacts hold transformers "
                            f"models and modules loaded from a folder with {MODULE_MANIFEST}")
    described = json.loads(source.read_text())
    rebuild = {key: described.get(key) for key in ("architecture", "kwargs", "example_input_shape")}
    return {**record, "kind": "module", "module": rebuild}


def _module_dir(spec: str) -> Path:
    if spec.startswith("zoo:"):
        from bitalloc.quant.zoo import zoo_model_dir

        return zoo_model_dir(spec.removeprefix("zoo:"))
    return Path(spec).expanduser()


def _write_beside(staging: Path, model: LoadedModel, manifest: dict) -> None:
    """The model's own files beside the weights, then the manifest naming every file's sha256."""
    if manifest["model"]["kind"] == "transformers":
        save_model_files(model, staging)
    manifest["files"] = {p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                         for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """An empty folder beside ``out`` to write a build into; when the block ends without an error
    it replaces ``out`` in one rename, so an interrupted build never leaves a half-written folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        yield staging
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        staging.rename(out)


def save_model_files(model: LoadedModel, folder: Path) -> None:
    """A transformers model's config, generation config and tokenizer: what a runtime reads beside the weights."""
    model.module.config.save_pretrained(folder)
    if getattr(model.module, "generation_config", None) is not None:
        model.module.generation_config.save_pretrained(folder)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
