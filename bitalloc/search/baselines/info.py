"""What baselines know of a unit and a model beyond the profile's rows.

A profile row says what each format costs a unit; the published rules also look at where
the unit sits (its block), what it is (a GGUF-style kind such as ``attn_v`` or
``ffn_down``) and how long its rows are (``K``, the length llama.cpp quantizes along).
``search`` knows nothing of models, so the caller (``service`` or ``bench``, from
``quant``'s units and GGUF names) fills these in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bitalloc.search.problem import Problem

# The GGUF tensor kinds the rules distinguish (llama.cpp's tensor categories); anything
# else, or None, is a tensor the rules leave at the mix's default type.
KINDS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv_b", "attn_output",
         "ffn_gate", "ffn_up", "ffn_down", "output", "token_embd")


@dataclass(frozen=True)
class UnitInfo:
    """``block``: the transformer block (None outside blocks, e.g. ``lm_head``);
    ``kind``: GGUF-style kind (see :data:`KINDS`; MoE kinds such as ``ffn_down_exps`` are
    matched as llama.cpp matches them, by substring); ``row``: the row length ``K``."""

    block: int | None = None
    kind: str | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0):
            raise ValueError(f"block must be a non-negative int or None, got {self.block!r}")
        if self.row is not None and (isinstance(self.row, bool) or not isinstance(self.row, int) or self.row <= 0):
            raise ValueError(f"row must be a positive int or None, got {self.row!r}")


@dataclass(frozen=True)
class ModelInfo:
    """Model-wide facts llama.cpp's rules read from the GGUF header.

    ``n_blocks``: ``hparams.n_layer`` (the block count); ``n_gqa``: attention heads per
    KV head; ``n_expert``: experts per MoE layer (0 for a dense model); ``arch``: the
    llama.cpp architecture name (only ``falcon`` changes the rules used here);
    ``is_70b``: llama.cpp's ``LLM_TYPE_70B``; ``has_output``: whether the GGUF holds a
    separate ``output.weight`` (False for tied embeddings: ``token_embd`` then takes the
    output tensor's rule).
    """

    n_blocks: int
    n_gqa: int = 1
    n_expert: int = 0
    arch: str = "llama"
    is_70b: bool = False
    has_output: bool = True

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {self.n_blocks}")
        if self.n_gqa < 1:
            raise ValueError(f"n_gqa must be at least 1, got {self.n_gqa}")


def infos_for(problem: Problem, infos: Mapping[str, UnitInfo]) -> list[UnitInfo]:
    """The infos in the problem's unit order; every unit must have one."""
    missing = [u for u in problem.unit_names if u not in infos]
    if missing:
        raise ValueError(f"infos: no UnitInfo for units {missing[:3]} ({len(missing)} missing)")
    return [infos[u] for u in problem.unit_names]
