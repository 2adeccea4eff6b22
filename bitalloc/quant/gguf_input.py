"""A ``.gguf`` model converted tensor by tensor into a transformers folder of safetensors shards,
so that a GGUF larger than memory can be streamed block by block like any checkpoint.

transformers loads a GGUF by dequantizing every tensor into one state dict. This walks the same
steps one tensor at a time: ``gguf``'s reader maps the file, each tensor is dequantized, passed
through transformers' own per-architecture ``TensorProcessor`` (which, for instance, undoes the
converter's q/k permutation for Llama) and renamed by its GGUF-to-transformers name map, then
cast and added to the current shard, which is written once it holds ``SHARD_BYTES``. The config
and the tokenizer come from the file's metadata as transformers reads them. The folder is keyed
by the file's sha256, written to a staging folder and renamed into place, so it is converted once
and never seen half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from bitalloc.quant.loading import ModelLoadError

SHARD_BYTES = 512 << 20
INDEX = "model.safetensors.index.json"


def converted_root() -> Path:
    """Where converted GGUF files are kept (``BITALLOC_GGUF_DIR``, default ``~/.cache/bitalloc/gguf``)."""
    return Path(os.environ.get("BITALLOC_GGUF_DIR", "~/.cache/bitalloc/gguf")).expanduser()


def gguf_path(spec: str) -> Path | None:
    """The local ``.gguf`` file ``spec`` names (after ``loading.check_model_spec``), or None."""
    path = Path(spec.strip()).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def gguf_nbytes(path: Path, dtype: torch.dtype) -> int:
    """What the file's tensors take dequantized to ``dtype`` (from its header: nothing dequantized)."""
    from gguf import GGUFReader

    size = torch.empty((), dtype=dtype).element_size()
    return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors) * size


def converted(path: Path, dtype: torch.dtype, sha256: str) -> Path:
    """The transformers folder converted from the GGUF ``path`` (whose sha256 is ``sha256``), in
    ``dtype``: made now unless an earlier conversion is there."""
    folder = converted_root() / f"{sha256[:32]}-{str(dtype).removeprefix('torch.')}"
    if (folder / INDEX).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        staging = Path(tmp) / "staging"
        convert(path, staging, dtype)
        if not (folder / INDEX).exists():  # another process may have finished the same conversion meanwhile
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
    return folder


def convert(path: Path, out: Path, dtype: torch.dtype) -> None:
    """Write ``path`` as a transformers folder in ``out``: config, tokenizer, safetensors shards and
    their index, one dequantized tensor in memory at a time (plus the shard being filled)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not read {path} as a GGUF model transformers knows: {exc}") from exc
    out.mkdir(parents=True)
    config.torch_dtype = dtype
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    architecture = parsed["config"].get("model_type")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    parsed["tensors"] = {}  # where a processor that merges tensors (experts) leaves its results

    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    filled = 0

    def flush() -> None:
        nonlocal shard, filled
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        shard, filled = {}, 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal filled
        shard[name] = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()
        filled += shard[name].numel() * shard[name].element_size()
        if filled >= SHARD_BYTES:
            flush()

    for tensor in GGUFReader(path).tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.weights is not None and result.name in names:
            add(names[result.name], torch.from_numpy(np.copy(result.weights)))
        for name, merged in parsed["tensors"].items():
            add(name, merged if isinstance(merged, torch.Tensor) else torch.from_numpy(np.copy(merged)))
        parsed["tensors"].clear()
    flush()
    if not weight_map:
        raise ModelLoadError(f"{path}: no tensor of the file maps onto {type(skeleton).__name__}'s parameters")
    total = sum((out / name).stat().st_size for name in set(weight_map.values()))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
