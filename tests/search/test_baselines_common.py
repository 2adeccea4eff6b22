"""Shared by the baseline tests: a synthetic Llama-like problem (30 blocks, SmolLM2's shapes); and the common helpers."""

from __future__ import annotations

import math

import numpy as np

from bitalloc.search import Problem
from bitalloc.search.baselines import UnitInfo

HIDDEN, INTER, KV = 576, 1536, 192
PROJ = {  # HF leaf -> (GGUF kind, [N, K])
    "self_attn.q_proj": ("attn_q", (HIDDEN, HIDDEN)),
    "self_attn.k_proj": ("attn_k", (KV, HIDDEN)),
    "self_attn.v_proj": ("attn_v", (KV, HIDDEN)),
    "self_attn.o_proj": ("attn_output", (HIDDEN, HIDDEN)),
    "mlp.gate_proj": ("ffn_gate", (INTER, HIDDEN)),
    "mlp.up_proj": ("ffn_up", (INTER, HIDDEN)),
    "mlp.down_proj": ("ffn_down", (HIDDEN, INTER)),
}
WIDTHS = (2, 3, 4, 5, 6, 8)


def int_bytes(shape: tuple[int, int], bits: int, group: int = 128) -> int:
    """Packed codes plus one float16 scale per group (partial last group counted whole)."""
    n, k = shape
    return n * math.ceil(k * bits / 32) * 4 + n * math.ceil(k / group) * 2


def llama_units(n_blocks: int = 30, lm_head: tuple[int, int] | None = None) -> list[tuple[str, str, int | None, tuple[int, int]]]:
    """(name, kind, block, shape) in module order; ``lm_head`` adds an output unit."""
    units = [(f"model.layers.{b}.{leaf}", kind, b, shape) for b in range(n_blocks) for leaf, (kind, shape) in PROJ.items()]
    if lm_head is not None:
        units.append(("lm_head", "output", None, lm_head))
    return units


def llama_problem(n_blocks: int = 30, lm_head: tuple[int, int] | None = None, bf16: bool = False,
                  seed: int = 0) -> tuple[Problem, dict[str, UnitInfo]]:
    units = llama_units(n_blocks, lm_head)
    formats = [f"int{b}_g128" for b in WIDTHS] + (["bf16"] if bf16 else [])
    sizes = np.array([[int_bytes(s, b) for b in WIDTHS] + ([s[0] * s[1] * 2] if bf16 else []) for *_, s in units])
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=(len(units), 1))
    bits = np.array([*WIDTHS] + ([16] if bf16 else []), dtype=float)
    error = scale * 4.0 ** (-bits)[None, :]
    problem = Problem(error=error, bytes=sizes, numel=[s[0] * s[1] for *_, s in units],
                      unit_names=[u[0] for u in units], format_names=formats)
    infos = {name: UnitInfo(block=block, kind=kind, row=shape[1]) for name, kind, block, shape in units}
    return problem, infos


def test_format_bits_count_scales_and_partial_groups():
    from bitalloc.search.baselines.common import format_bits

    problem, _ = llama_problem(n_blocks=1)
    bits = format_bits(problem)
    numel = sum(s[0] * s[1] for *_, s in llama_units(1))
    for f, b in enumerate(WIDTHS):
        expected = 8 * sum(int_bytes(s, b) for *_, s in llama_units(1)) / numel
        assert bits[f] == expected
    # K = 576 is 4.5 groups of 128: the partial group's scale puts int4_g128 above 4.125
    assert 4.125 < bits[WIDTHS.index(4)] < 4.15


def test_nearest_format_breaks_ties_towards_the_larger():
    from bitalloc.search.baselines.common import nearest_format

    bpw = np.array([2.125, 3.125, 4.125])
    assert nearest_format(2.625, [0, 1, 2], bpw) == 1  # exactly between: the larger
    assert nearest_format(2.6, [0, 1, 2], bpw) == 0
    assert nearest_format(9.0, [0, 1], bpw) == 1  # only allowed candidates count
