"""A transformers model run block by block, each block's weights read from disk only while it runs.

A model larger than memory is profiled the way GPTQ and llm-compressor's sequential pipeline
walk it: the skeleton is built with its parameters on the meta device (no memory); the
weights outside the decoder blocks (embeddings, final norm, head: a small share of a large
model) are read once; then each block in turn is read from the safetensors shards
(``safe_open``, one tensor at a time, never a full load), run on the calibration batches,
and put back on the meta device.

Calibration activations pass from block to block: the inputs of the first block are captured
once (the hidden states, and the keyword arguments the model hands every block: attention
mask, position ids, rotary position embeddings), and each block's outputs are the next
block's hidden states. Peak memory is one block's weights, the boundary states of the
calibration batches and one block's activations, whatever the depth; a backward walk, which
keeps the states entering every block, holds them within a share of the memory cap and spills
the rest to disk (``quant.states``).

The decoder blocks are found by shape, not by name (``decoder_blocks``): the repeated blocks
of any causal LM are the ``ModuleList`` of same-class modules that holds most parameters.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import torch
from safetensors import safe_open
from torch import nn

from bitalloc.quant.checksum import file_sha256
from bitalloc.quant.device import free_memory
from bitalloc.quant.loading import LoadedModel, LoadPolicy, ModelLoadError, load_model, model_folder
from bitalloc.quant.states import BoundaryStates
from bitalloc.quant.units import DEFAULT_EXCLUDE, UnitSet, enumerate_units, shared_input_groups

INDEX = "model.safetensors.index.json"
# A backward walk keeps at most 1/STATE_SHARE of the memory cap in boundary states, the rest
# spilled to disk: the cap also holds one block's weights and activations and what lies outside
# the blocks.
STATE_SHARE = 4


@dataclass
class Checkpoint:
    """The safetensors shards of a model folder: which file holds each tensor, read on demand."""

    folder: Path
    files: dict[str, Path]  # tensor name -> shard

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint":
        index = folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(folder, {name: folder / shard for name, shard in weight_map.items()})
        files: dict[str, Path] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as handle:
                files.update(dict.fromkeys(handle.keys(), shard))
        if not files:
            raise ModelLoadError(f"{folder} has no *.safetensors weights to stream")
        return cls(folder, files)

    def read(self, names: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors, each cast to ``dtype`` on ``device`` as it is read (shard by shard)."""
        missing = [name for name in names if name not in self.files]
        if missing:
            raise ModelLoadError(f"{self.folder}: the checkpoint has no tensor {missing[0]!r} (streaming needs "
                                 "checkpoint names that match the model's parameters)")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for path, members in by_file.items():
            with safe_open(path, framework="pt") as handle:
                for name in members:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
        return tensors

    def nbytes(self, dtype: torch.dtype) -> int:
        """What the floating-point weights take in ``dtype`` (read from the headers only)."""
        total = 0
        size = torch.empty((), dtype=dtype).element_size()
        for path in sorted(set(self.files.values())):
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    numel = 1
                    for extent in view.get_shape():
                        numel *= extent
                    total += numel * size
        return total

    def fingerprint(self) -> str:
        """sha256 over the config's and every shard's own sha256: the model's identity for caching,
        without holding its weights (``known_sha256`` says when the bytes are not read at all)."""
        digest = hashlib.sha256()
        for path in [self.folder / "config.json", *sorted(set(self.files.values()))]:
            digest.update(f"{path.name}:{known_sha256(path)}".encode())
        return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def known_sha256(path: Path) -> str:
    """A checkpoint file's sha256 without reading it where that can be trusted: a Hugging Face hub
    cache names each large file's blob by its sha256 (snapshots link to ``blobs/<sha256>``), and a
    file this process hashed before is known by its (path, inode, size, mtime); anything else is
    read once, in chunks."""
    real = path.resolve()
    if real.parent.name == "blobs" and _HUB_BLOB.fullmatch(real.name):
        return real.name
    stat = real.stat()
    key = (str(real), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(real)
    return _DIGESTS[key]


def decoder_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ``ModuleList`` of the model's repeated blocks: of the lists whose members are all
    one class, the one holding most parameters (meta parameters count too)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) < 1 or len({type(m) for m in child}) != 1:
            continue
        size = sum(p.numel() for p in child.parameters())
        if best is None or size > best[0]:
            best = (size, name, child)
    if best is None:
        raise ModelLoadError(f"{type(module).__name__} has no list of repeated blocks to stream")
    return best[1], best[2]


@dataclass
class BlockInputs:
    """What the model hands one block for one calibration batch: positional arguments (the first
    is the hidden states, unless passed by keyword) and keyword arguments."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        if self.args:
            return BlockInputs((hidden, *self.args[1:]), self.kwargs)
        return BlockInputs(self.args, {**self.kwargs, "hidden_states": hidden})

    def run(self, block: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``block``'s output hidden states on these inputs (with ``hidden`` in place of their own)."""
        step = self if hidden is None else self.with_hidden(hidden)
        return hidden_of(block(*step.args, **step.kwargs))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the heap pages freed since the last call back to the system. glibc keeps freed chunks
    below its mmap threshold (which grows to 32 MiB as large tensors are freed) for reuse; a
    block's weights, Hessians and quantized cells, freed after every block, then fragment the
    heap, and the process's resident memory drifts hundreds of MiB above what it holds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Captured(Exception):
    """Raised by the first block's hook: the model need not run further."""


@dataclass
class StreamedModel(LoadedModel):
    """A causal LM whose decoder blocks stay on the meta device until ``materialized``.

    ``module`` is the skeleton: what lies outside the blocks is real, on ``device`` in ``dtype``.
    """

    checkpoint: Checkpoint | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    blocks_path: str = ""
    # Bytes of boundary states a backward walk keeps in memory; the rest spill to disk
    # (``quant.states``). None: no limit.
    state_budget: int | None = None

    def boundary_states(self) -> BoundaryStates:
        """An empty store of boundary states, held to this model's ``state_budget``."""
        return BoundaryStates(self.state_budget, self.device)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.module.get_submodule(self.blocks_path)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}."

    def block_of(self, name: str) -> int | None:
        """The index of the block that holds the module or tensor ``name``; None outside the blocks."""
        head, _, rest = name.partition(f"{self.blocks_path}.")
        index = rest.partition(".")[0] if not head else ""
        return int(index) if index.isdigit() and int(index) < len(self.blocks) else None

    @contextlib.contextmanager
    def materialized(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights read from the checkpoint; back on the meta device after."""
        block = self.blocks[index]
        prefix = self.block_prefix(index)
        names = [prefix + name for name, _ in block.named_parameters()]
        _assign(block, {name.removeprefix(prefix): t for name, t in
                        self.checkpoint.read(names, self.device, self.dtype).items()})
        try:
            yield block
        finally:
            _assign(block, {name: torch.empty_like(p, device="meta") for name, p in block.named_parameters()})
            release_freed_memory()

    def block_inputs(self, batches: list[torch.Tensor]) -> list[BlockInputs]:
        """The first block's inputs for each batch of token windows (the model stops there)."""
        captured: list[BlockInputs] = []

        def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(BlockInputs(args, kwargs))
            raise _Captured

        handle = self.blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    with contextlib.suppress(_Captured):
                        self.module(batch.to(self.device), use_cache=False)
        finally:
            handle.remove()
        return captured

    def walk(self, batches: list[torch.Tensor], visit: Callable[[int, nn.Module], ContextManager],
             blocks: range | None = None, entry: list[torch.Tensor] | None = None) -> list[BlockInputs]:
        """Run the blocks in order on the batches, each block's outputs the next one's inputs, and
        return what the last block run output (as the inputs it was handed, with the new hidden
        states). ``visit(index, block)`` is entered for each block of ``blocks`` (default: all) with
        the block materialized, before it runs (hooks it installs see the block's passes; weights it
        changes are the ones that run), and left after, while the block is still there. Blocks
        before the range run only to reach it, unless ``entry`` gives the hidden states entering
        its first block (one tensor per batch, ``entry_states``); none after it runs."""
        blocks = range(len(self.blocks)) if blocks is None else blocks
        inputs = self.block_inputs(batches)
        first = 0
        if entry is not None:
            if len(entry) != len(inputs):
                raise ValueError(f"{len(entry)} entry states for {len(inputs)} batches")
            inputs = [step.with_hidden(state.to(self.device, self.dtype)) for step, state in zip(inputs, entry)]
            first = blocks.start
        for index in range(first, blocks.stop):
            with self.materialized(index) as block, (visit(index, block) if index in blocks else contextlib.nullcontext()):
                with torch.no_grad():
                    inputs = [step.with_hidden(step.run(block)) for step in inputs]
        return inputs

    def walk_to_head(self, batches: list[torch.Tensor], loss: Callable[[int, torch.Tensor], torch.Tensor],
                     visit: Callable[[int, nn.Module], ContextManager] | None = None,
                     done: Callable[[int], None] = lambda blocks: None,
                     ) -> tuple[list[BlockInputs], BoundaryStates, list[torch.Tensor]]:
        """The first half of a backward pass through the blocks: their inputs, the hidden states
        entering every block (and leaving the last) per batch, and the gradient of
        ``loss(index, batch)`` in the last hidden states; the caller walks back down the blocks
        with them, and closes the states (some may be spill files). ``visit`` is entered around
        each block's forward as in ``walk`` (to quantize it, say); ``done(k)`` hears that k
        blocks, then the head (k = blocks + 1), are through."""
        inputs = self.block_inputs(batches)
        states = self.boundary_states()
        hidden = [step.hidden for step in inputs]
        states.append(hidden)
        for i in range(len(self.blocks)):
            with self.materialized(i) as block, (visit(i, block) if visit else contextlib.nullcontext()), \
                    torch.no_grad():
                hidden = [step.run(block, h) for step, h in zip(inputs, hidden)]
            states.append(hidden)
            done(i + 1)
        grads = []
        for b, (batch, last) in enumerate(zip(batches, hidden)):
            last = last.detach().requires_grad_()
            with self.bypassed(last), torch.enable_grad():
                grads.append(torch.autograd.grad(loss(b, batch), last)[0])
        done(len(self.blocks) + 1)
        return inputs, states, grads

    def entry_states(self, batches: list[torch.Tensor], starts: list[int]) -> dict[int, list[torch.Tensor]]:
        """The hidden states entering each block of ``starts`` (one tensor per batch), from one
        forward walk: what lets a block range run without the blocks before it."""
        wanted = sorted(set(starts))
        found: dict[int, list[torch.Tensor]] = {}
        inputs = self.block_inputs(batches)
        for index in range(wanted[-1] if wanted else 0):
            if index in wanted:
                found[index] = [step.hidden for step in inputs]
            with self.materialized(index) as block, torch.no_grad():
                inputs = [step.with_hidden(step.run(block)) for step in inputs]
        if wanted:
            found[wanted[-1]] = [step.hidden for step in inputs]
        return found

    def units(self, *, kv_cache: bool = False, include: Sequence[str] | None = None,
              exclude: Sequence[str] = DEFAULT_EXCLUDE) -> UnitSet:
        """``units.enumerate_units`` of the skeleton, tie groups found on a materialized block."""
        return enumerate_units(self.module, include=include, exclude=exclude, kv_cache=kv_cache,
                               find_groups=self.tie_groups)

    @contextlib.contextmanager
    def bypassed(self, hidden: torch.Tensor) -> Iterator[None]:
        """The model with its blocks replaced by one that outputs ``hidden``: a forward pass then runs
        only what follows the blocks (final norm, head) on those last hidden states."""
        parent_path, _, leaf = self.blocks_path.rpartition(".")
        parent = self.module.get_submodule(parent_path)
        saved = parent._modules[leaf]
        parent._modules[leaf] = nn.ModuleList([_Emit(hidden)])
        try:
            yield
        finally:
            parent._modules[leaf] = saved

    def tie_groups(self, names: list[str]) -> list[list[str]]:
        """The groups of units that read one input (``units.shared_input_groups``), found on the first
        block and repeated in every block: the blocks are instances of one class."""
        first = self.block_prefix(0)
        inputs = self.block_inputs([self.example_inputs["input_ids"]])[0]
        local = [n.removeprefix(first) for n in names if n.startswith(first)]
        with self.materialized(0) as block:
            groups = shared_input_groups(_Bound(block, inputs), [f"block.{n}" for n in local], ())
        wanted = set(names)
        result = []
        for index in range(len(self.blocks)):
            prefix = self.block_prefix(index)
            for group in groups:
                members = [prefix + n.removeprefix("block.") for n in group]
                if all(m in wanted for m in members):
                    result.append(members)
        return result


class _Emit(nn.Module):
    """A stand-in block that outputs given hidden states, whatever it is handed."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden


class _Bound(nn.Module):
    """A block bound to its captured inputs, so that a plain ``module()`` call runs it."""

    def __init__(self, block: nn.Module, inputs: BlockInputs) -> None:
        super().__init__()
        self.block = block
        self.inputs = inputs

    def forward(self) -> Any:
        return self.block(*self.inputs.args, **self.inputs.kwargs)


def hidden_of(output: Any) -> torch.Tensor:
    """A block's output hidden states: the tensor itself, or the first element of a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace parameters (by dotted name under ``module``) with frozen parameters holding ``tensors``."""
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _place_buffers(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Buffers (rotary frequencies, ...) on ``device``, floating ones in ``dtype``: what ``module.to``
    does to them in the in-memory path, so that both paths compute alike."""
    for child in module.modules():
        for name, buffer in child._buffers.items():
            if buffer is not None:
                child._buffers[name] = buffer.to(device, dtype if buffer.is_floating_point() else buffer.dtype)


def open_streamed(folder: Path, spec: str, dtype: torch.dtype, device: torch.device,
                  trust_remote_code: bool = False) -> StreamedModel:
    """The model in ``folder`` as a skeleton whose blocks are read from its shards when run."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint = Checkpoint.open(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            module = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not build {folder} to stream it: {exc}") from exc
    module.eval()
    _place_buffers(module, device, dtype)
    blocks_path, _ = decoder_blocks(module)
    outside = [name for name, _ in module.named_parameters(remove_duplicate=False)
               if not name.startswith(blocks_path + ".")]
    stored = [name for name in outside if name in checkpoint.files]
    _assign(module, checkpoint.read(stored, device, dtype))
    _tie_missing(module, [name for name in outside if name not in checkpoint.files], folder)
    example = {"input_ids": torch.arange(2, 18).unsqueeze(0) % config.vocab_size}
    return StreamedModel(spec, module, tokenizer, example, {"architecture": type(module).__name__},
                         checkpoint=checkpoint, device=device, dtype=dtype, blocks_path=blocks_path)


def _tie_missing(module: nn.Module, missing: list[str], folder: Path) -> None:
    """The output embedding, when the checkpoint leaves it out because it is tied to the input one."""
    output = module.get_output_embeddings()
    tied = getattr(module.config, "tie_word_embeddings", False) and output is not None
    names = {name for name, p in module.named_parameters(remove_duplicate=False) if tied and p is output.weight}
    if set(missing) - names:
        raise ModelLoadError(f"{folder}: the checkpoint lacks {sorted(set(missing) - names)[0]!r}")
    if names:
        output.weight = module.get_input_embeddings().weight


def load_within(spec: str, policy: LoadPolicy, *, dtype: torch.dtype, device: torch.device,
                max_memory: int | None = None, stream: bool = False) -> LoadedModel:
    """``spec`` loaded whole onto ``device`` when its weights fit in ``max_memory`` (default: what the
    device has free), else (or whenever ``stream`` asks) as a ``StreamedModel``. A local transformers
    folder with safetensors streams, and so does a local ``.gguf`` (converted to one first,
    ``quant.gguf_input``); anything else loads whole."""
    from bitalloc.quant.gguf_input import converted, gguf_nbytes, gguf_path

    folder = model_folder(spec, policy)
    gguf = gguf_path(spec) if folder is None else None
    if folder is None and gguf is None:
        if stream:
            raise ModelLoadError(f"{spec} cannot be streamed block by block: that needs a local transformers "
                                 "folder (config.json and *.safetensors shards) or a .gguf file")
        return load_model(spec, policy, dtype, device)
    why = "asked for"
    limit = max_memory if max_memory is not None else free_memory(device)
    if not stream:
        size = gguf_nbytes(gguf, dtype) if gguf is not None else Checkpoint.open(folder).nbytes(dtype)
        if size <= limit:
            return load_model(spec, policy, dtype, device)
        why = (f"its weights take {size / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')}, more than the "
               f"{limit / 2**30:.2f} GiB {'max_memory allows' if max_memory is not None else f'free on {device}'}")
    if gguf is not None:  # dequantized tensor by tensor into safetensors shards, once per file
        folder = converted(gguf, dtype, known_sha256(gguf))
        why += f"; converted from GGUF into {folder}"
    model = open_streamed(folder, spec.strip(), dtype, device, trust_remote_code=policy.trust_remote_code)
    model.info["streamed"] = why
    model.state_budget = limit // STATE_SHARE
    return model
