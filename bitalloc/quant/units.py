"""Units: the parts of a model that each receive one format.

A weight unit is a Linear or Conv weight, seen as a matrix ``[N, K]`` (outputs x inputs);
a KV unit is the key or value cache of one attention layer. Tie groups are units that a
runtime fuses into one kernel (q/k/v, gate/up) and so must share a format. They are found
by what the model does, not by what its modules are called: modules that read the very
same input tensor in a forward pass are the ones runtimes concatenate. Name patterns are
the fallback when no example input is at hand.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from bitalloc.quant.device import module_device, to_device

UnitKind = Literal["weight", "kv_key", "kv_value"]

DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*wte*", "*wpe*", "*embed_out*")
# Sibling names that runtimes fuse, for models whose forward pass cannot be run here.
FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


@dataclass(frozen=True)
class Unit:
    """One thing that receives one format.

    ``shape`` is the matrix view ``[N, K]`` for weights and ``[kv_heads, head_dim]`` for a
    cache; ``bytes_per_token`` is what a KV unit costs per cached token at 16 bits;
    ``window`` is the most tokens a cache holds (a sliding-window attention layer keeps only
    its last ``window`` tokens), None when it holds the whole context.
    """

    name: str
    kind: UnitKind
    shape: tuple[int, int]
    block: int | None = None
    bytes_per_token: int | None = None
    window: int | None = None

    def cached_tokens(self, context: int) -> int:
        """Tokens this cache holds at ``context``: the context, or the layer's window if shorter."""
        return context if self.window is None else min(context, self.window)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class UnitSet:
    """The units of one model and the tie groups among them (lists of unit names)."""

    units: list[Unit]
    tie_groups: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.units)

    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def index(self) -> dict[str, int]:
        return {u.name: i for i, u in enumerate(self.units)}

    @property
    def weights(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "weight"]


def is_transposed_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` stores its weight as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_transposed_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[N, K]``: outputs by inputs (Conv kernels flattened into K)."""
    return as_matrix(module, module.weight)


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the module's weight (the weight, its gradient) as ``[N, K]``."""
    if is_transposed_conv1d(module):
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an ``[N, K]`` matrix back into the module's weight, in its own layout and dtype."""
    w = module.weight
    value = matrix.t() if is_transposed_conv1d(module) else matrix.reshape(w.shape)
    with torch.no_grad():
        w.copy_(value.to(w.dtype))


_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_index(name: str) -> int | None:
    """The first numeric path component: the block a module belongs to, for most models."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def weight_units(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[Unit]:
    """Every quantizable weight, in module order. ``include``/``exclude`` are glob patterns."""
    units = []
    for name, module in model.named_modules():
        if not is_quantizable(module) or _matches(name, exclude):
            continue
        if include is not None and not _matches(name, include):
            continue
        n, k = weight_matrix(module).shape
        units.append(Unit(name, "weight", (int(n), int(k)), block_index(name)))
    return units


def shared_input_groups(model: nn.Module, names: Sequence[str], example_inputs: dict | tuple) -> list[list[str]]:
    """Groups of modules that receive the identical input tensor in one forward pass."""
    wanted = set(names)
    seen: dict[int, list[str]] = {}
    keep_alive: list[torch.Tensor] = []
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                keep_alive.append(args[0])  # ids stay unique while the pass runs
                seen.setdefault(id(args[0]), [])
                if name not in seen[id(args[0])]:
                    seen[id(args[0])].append(name)
        return record

    for name, module in model.named_modules():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(hook(name)))
    example_inputs = to_device(example_inputs, module_device(model))
    try:
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    # A module called on several inputs (weight sharing) may sit in two groups: merge them.
    return _merge_overlapping([g for g in seen.values() if len(g) > 1])


def _merge_overlapping(groups: list[list[str]]) -> list[list[str]]:
    merged: list[set[str]] = []
    for group in groups:
        members = set(group)
        touching = [m for m in merged if m & members]
        merged = [m for m in merged if not m & members] + [members.union(*touching)]
    return [list(m) for m in merged]


def sibling_groups(names: Sequence[str], siblings: Sequence[Sequence[str]] = FUSED_SIBLINGS) -> list[list[str]]:
    """Fallback tie groups: modules of one parent whose last names form a fused set."""
    by_parent: dict[str, dict[str, str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = name
    groups = []
    for children in by_parent.values():
        for fused in siblings:
            members = [children[leaf] for leaf in fused if leaf in children]
            if len(members) > 1:
                groups.append(members)
    return groups


def attention_windows(config: Any, layers: int) -> list[int | None]:
    """Each layer's sliding window, read from the config (not the family's name): ``layer_types``
    marks the sliding layers of hybrid layouts (Gemma-2/3, Qwen2 with ``use_sliding_window``);
    without it, a ``sliding_window`` applies to every layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:layers]]
    return [window] * layers


def kv_units(model: nn.Module) -> list[Unit]:
    """The K and V cache of each attention layer, from a transformers config; none otherwise."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if config is None or not layers or not heads:
        return []
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = kv_heads * head_dim * 2
    units = []
    for layer, window in enumerate(attention_windows(config, layers)):
        units.append(Unit(f"kv.{layer}.key", "kv_key", (kv_heads, head_dim), layer, per_token, window))
        units.append(Unit(f"kv.{layer}.value", "kv_value", (kv_heads, head_dim), layer, per_token, window))
    return units


def enumerate_units(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    example_inputs: dict | tuple | None = None,
    kv_cache: bool = False,
    find_groups: Callable[[list[str]], list[list[str]]] | None = None,
) -> UnitSet:
    """The model's units and tie groups.

    With ``example_inputs`` the tie groups come from one forward pass (shared inputs);
    without, from ``FUSED_SIBLINGS`` name patterns; ``find_groups(names)`` replaces both (a
    streamed model finds them block by block). ``kv_cache`` adds the KV units.
    """
    units = weight_units(model, include, exclude)
    names = [u.name for u in units]
    if find_groups is not None:
        groups = find_groups(names)
    elif example_inputs is not None:
        groups = shared_input_groups(model, names, example_inputs)
    else:
        groups = sibling_groups(names)
    order = {n: i for i, n in enumerate(names)}
    groups = sorted((sorted(g, key=order.__getitem__) for g in groups), key=lambda g: order[g[0]])
    if kv_cache:
        units += kv_units(model)
    return UnitSet(units, groups)
