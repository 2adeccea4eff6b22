"""Which units may interact: each unit's kind and block, and the pairs the surrogate models.

Quantization errors of two units interact most where one feeds the other: inside one
transformer block, and between a block and the next. The surrogate shares one pairwise
weight per *class* of pair (the two kinds and the block offset, e.g. ``self_attn.o_proj``
with ``mlp.down_proj`` one block on), so a few dozen weights describe a model of any depth.

A unit's block is given by the caller (``quant.units.block_index`` for models: the first
numeric path component); its kind is its name with that component masked, so
``model.layers.3.mlp.down_proj`` is the kind ``model.layers.*.mlp.down_proj`` in any family.
A unit with no block (``lm_head``) is its own kind and takes part in no pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """``kinds[u]`` indexes ``kind_names``; ``pairs[p] = (u, v)`` with ``u`` in the same block as
    ``v`` or the one before; ``pair_class[p]`` indexes ``class_names``."""

    kind_names: tuple[str, ...]
    kinds: np.ndarray
    pairs: np.ndarray
    pair_class: np.ndarray
    class_names: tuple[str, ...]

    @classmethod
    def of(cls, unit_names: Sequence[str], blocks: Sequence[int | None] | None = None, reach: int = 1) -> Layout:
        """The layout of units by name; ``blocks`` (one per unit, None outside blocks) enables the
        pairs of units at most ``reach`` blocks apart. Without blocks only kinds apply."""
        blocks = [None] * len(unit_names) if blocks is None else list(blocks)
        if len(blocks) != len(unit_names):
            raise ValueError(f"blocks has {len(blocks)} entries, expected one per unit ({len(unit_names)})")
        if reach < 0:
            raise ValueError(f"reach must be >= 0, got {reach}")
        kind_of = [kind_name(name, block) for name, block in zip(unit_names, blocks)]
        kind_names = tuple(dict.fromkeys(kind_of))
        kinds = np.array([kind_names.index(k) for k in kind_of], dtype=np.int64)
        pairs, labels = [], []
        in_blocks = [u for u, b in enumerate(blocks) if b is not None]
        for i, u in enumerate(in_blocks):
            for v in in_blocks[i + 1:]:
                offset = blocks[v] - blocks[u]  # type: ignore[operator]
                if abs(offset) > reach:
                    continue
                first, second = (u, v) if offset > 0 or (offset == 0 and kind_of[u] <= kind_of[v]) else (v, u)
                pairs.append((first, second))
                labels.append(f"{kind_of[first]} ~ {kind_of[second]} +{abs(offset)}")
        class_names = tuple(dict.fromkeys(labels))
        return cls(kind_names=kind_names, kinds=kinds, pairs=np.array(pairs, dtype=np.int64).reshape(-1, 2),
                   pair_class=np.array([class_names.index(c) for c in labels], dtype=np.int64),
                   class_names=class_names)


def kind_name(name: str, block: int | None) -> str:
    """A unit's name with its block's path component masked: what units of one kind share."""
    if block is None:
        return name
    parts = name.split(".")
    if str(block) not in parts:
        raise ValueError(f"blocks: unit {name!r} has no path component {block}")
    parts[parts.index(str(block))] = "*"
    return ".".join(parts)
