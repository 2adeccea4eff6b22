"""llama.cpp's k-quant mixes: the per-tensor type ``llama-quantize`` picks, mapped onto our formats.

A port of ``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` in llama.cpp's
``src/llama-quant.cpp`` (ggml-org/llama.cpp at 007dbbf3), for the k-quant file types
without an importance matrix. Only the branches these file types reach are ported: the
IQ*/TQ*/MXFP4 types and the imatrix-only branches are left out. Per tensor, by its kind
(llama.cpp's tensor category) and its block:

* ``output`` (and ``token_embd`` when the embeddings are tied): ``Q8_0`` when the row
  length is not a multiple of the mix's block size (or for Falcon), else ``Q6_K``.
* ``attn_v`` (and ``attn_qkv``/``attn_kv_b``, which the current source counts as attn_v):
  Q2_K -> Q4_K if n_gqa >= 4 else Q3_K; Q3_K_M -> Q5_K for the first two, else Q4_K;
  Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K where ``use_more_bits``; Q4_K_S -> Q5_K for the
  first four; 70B: Q3_K/Q4_K -> Q5_K; 8 experts: Q8_0.
* ``attn_k``: 8 experts -> Q8_0.
* ``ffn_down``: Q2_K -> Q3_K; Q3_K_M -> Q5_K below n/16, else Q4_K (Falcon: Q4_K only where
  ``use_more_bits``, else Q3_K); Q3_K_L -> Q5_K (Falcon Q4_K); Q4_K_M -> Q6_K where
  ``use_more_bits`` (Falcon: Q6_K below n/16, Q5_K where use_more_bits, else Q4_K);
  Q5_K_M -> Q6_K where ``use_more_bits``; Q4_K_S -> Q5_K below n/8 (not Falcon).
* ``attn_output``: 8 experts -> Q5_K for Q2_K..Q4_K_M; else Q2_K -> Q3_K, Q3_K_M -> Q4_K,
  Q3_K_L -> Q5_K (Falcon: Q3_K_L -> Q4_K).
* everything else: the file type's default type.

``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division).
llama.cpp's counters ``i_attention_wv`` and ``i_ffn_down`` count tensors in the loader's
order, which sorts by block number (``weight_name_comparer``), with one attn_v and one
ffn_down per block; so the counter is the block index and ``n`` the block count, which is
what is used here (for MoE llama.cpp reads the block from the name, the same number).

The fallback (``fallback=True``, what llama-quantize really writes): a k-quant needs rows
that are a multiple of 256 (QK_K); otherwise Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, and F16 if even those blocks of 32 do not divide the row. (Releases before
the ``tensor_type_fallback`` refactor wrote IQ4_NL instead of Q4_0 for Q2_K/Q3_K: the same
4.5 bits per weight, so the same format here.) ``fallback=False`` gives the plain rules.

Each ggml type is then mapped to a format the unit allows: llama.cpp's type itself when the
job's formats include it (a ``q4_k`` format, or any ggml format that llama-quantize writes as
that type on this row, as ``q4_k`` is written Q5_0 on rows of 576), else the format with the
nearest bits per weight (ties to the larger), bits per weight as the problem's bytes count them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bitalloc import ggml
from bitalloc.search.allocation import Allocation
from bitalloc.search.baselines.common import (
    format_bits,
    format_index,
    nearest_format,
    pin_fixed,
)
from bitalloc.search.baselines.info import ModelInfo, UnitInfo, infos_for
from bitalloc.search.problem import Problem

GGML_BPW: dict[str, float] = {t: ggml.bits_per_weight(t) for t in ggml.TYPES if t != "IQ4_XS"}

# llama_ftype_get_default_type, for the file types ported here.
FTYPES: dict[str, str] = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def category(kind: str | None) -> str:
    """llama.cpp's ``tensor_get_category`` of a GGUF kind (``blk.N.<kind>.weight``)."""
    if kind is None:
        return "other"
    if kind == "output":
        return "output"
    if kind in ("token_embd", "per_layer_token_embd"):
        return "token_embd"
    name = f"{kind}.weight"
    for cat, needle in (("attn_qkv", "attn_qkv.weight"), ("attn_kv_b", "attn_kv_b.weight"),
                        ("attn_v", "attn_v.weight"), ("attn_k", "attn_k.weight"), ("attn_q", "attn_q.weight"),
                        ("attn_output", "attn_output.weight"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                        ("ffn_down", "ffn_down")):
        if needle in name:
            return cat
    return "other"


def _block(info: UnitInfo, what: str) -> int:
    if info.block is None:
        raise ValueError(f"llamacpp: a {what} tensor needs its block index")
    return info.block


def rule_type(info: UnitInfo, ftype: str, model: ModelInfo) -> str:
    """The type ``llama_tensor_get_type_impl`` picks for one tensor, before any fallback."""
    if ftype not in FTYPES:
        raise ValueError(f"ftype: unknown llama.cpp file type {ftype!r}; ported: {', '.join(FTYPES)}")
    new = FTYPES[ftype]
    cat = category(info.kind)
    falcon = model.arch == "falcon"
    n = model.n_blocks
    if cat == "output" or (not model.has_output and cat == "token_embd"):
        if info.row is None:
            raise ValueError("llamacpp: the output tensor's rule needs its row length")
        if falcon or not ggml.fits(new, info.row):
            return "Q8_0"
        return "Q6_K" if new != "Q8_0" else new
    if cat == "token_embd":
        return new  # no rule for the k-quant file types
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i = _block(info, "attn_v")
        if ftype == "Q2_K":
            new = "Q4_K" if model.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if model.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if model.n_expert == 8:
            new = "Q8_0"
        return new
    if cat == "attn_k":
        return "Q8_0" if model.n_expert == 8 else new
    if cat == "ffn_down":
        i = _block(info, "ffn_down")
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else ("Q4_K" if not falcon or use_more_bits(i, n) else "Q3_K")
        elif ftype == "Q3_K_L":
            new = "Q4_K" if falcon else "Q5_K"
        elif ftype == "Q4_K_M":
            if falcon:
                new = "Q6_K" if i < n // 16 else ("Q5_K" if use_more_bits(i, n) else "Q4_K")
            elif use_more_bits(i, n):
                new = "Q6_K"
        elif ftype == "Q5_K_M" and use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and not falcon and i < n // 8:
            new = "Q5_K"
        return new
    if cat == "attn_output":
        if not falcon:
            if model.n_expert == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    new = "Q5_K"
            elif ftype == "Q2_K":
                new = "Q3_K"
            elif ftype == "Q3_K_M":
                new = "Q4_K"
            elif ftype == "Q3_K_L":
                new = "Q5_K"
        elif ftype == "Q3_K_L":
            new = "Q4_K"
        return new
    return new  # attn_q, ffn_gate, ffn_up, other: rules only for IQ types


def fallback_type(ggml_type: str, row: int) -> str:
    """``tensor_type_fallback``: a type whose block divides the row length."""
    try:
        return ggml.stored_type(ggml_type, row)
    except ValueError as exc:
        raise ValueError(f"llamacpp: {exc}") from None


def tensor_type(info: UnitInfo, ftype: str, model: ModelInfo, fallback: bool = True) -> str:
    """The ggml type llama-quantize writes for one tensor (``fallback=False``: the plain rules)."""
    new = rule_type(info, ftype, model)
    if fallback:
        if info.row is None:
            raise ValueError("llamacpp: the fallback needs every unit's row length")
        new = fallback_type(new, info.row)
    return new


def _bits(problem: Problem, bpw: Mapping[str, float] | None) -> np.ndarray:
    bits = format_bits(problem)
    if bpw is not None:
        bits = np.array([float(bpw.get(f, b)) for f, b in zip(problem.format_names, bits)])
    return bits


def _candidates(problem: Problem, formats: Sequence[str | int] | None) -> np.ndarray:
    mask = np.ones(problem.n_formats, dtype=bool)
    if formats is not None:
        mask[:] = False
        mask[[format_index(problem, f, "formats") for f in formats]] = True
    return mask


def map_types(problem: Problem, types: list[str], bpw: Mapping[str, float] | None = None,
              formats: Sequence[str | int] | None = None, rows: Sequence[int | None] | None = None) -> np.ndarray:
    """Each unit's ggml type -> the allowed format (among ``formats``, default all) that is that
    type on the unit's row (``rows``), else the one with the nearest bits per weight; ties go to
    the larger."""
    bits, among = _bits(problem, bpw), _candidates(problem, formats)
    choice = np.empty(problem.n_units, dtype=np.int64)
    for u, t in enumerate(types):
        candidates = list(np.flatnonzero(problem.allowed[u] & among))
        if not candidates:
            raise ValueError(f"llamacpp: unit {problem.unit_names[u]} allows none of the candidate formats")
        exact = same_type(problem, t, None if rows is None else rows[u], candidates)
        choice[u] = exact if exact is not None else nearest_format(GGML_BPW[t], candidates, bits)
    return choice


def same_type(problem: Problem, ggml_type: str, row: int | None, candidates: Sequence[int]) -> int | None:
    """The candidate that llama-quantize writes as ``ggml_type`` on rows of ``row`` (the format
    named so first), or None when the job's formats have none (or the row is unknown)."""
    if row is None:
        return None
    exact = [f for f in candidates
             if (own := ggml.format_type(problem.format_names[f])) and ggml.stored_type(own, row) == ggml_type]
    return min(exact, key=lambda f: problem.format_names[f] != ggml_type.lower()) if exact else None


def format_table(problem: Problem, bpw: Mapping[str, float] | None = None,
                 formats: Sequence[str | int] | None = None) -> dict[str, str]:
    """ggml type -> format, for a unit that allows every candidate format (the documented table)."""
    bits, among = _bits(problem, bpw), _candidates(problem, formats)
    every = [f for f in range(problem.n_formats) if among[f] and np.isfinite(bits[f])]
    return {t: problem.format_names[nearest_format(b, every, bits)] for t, b in GGML_BPW.items()}


def llamacpp(problem: Problem, infos: Mapping[str, UnitInfo], ftype: str, model: ModelInfo,
             fallback: bool = True, bpw: Mapping[str, float] | None = None,
             formats: Sequence[str | int] | None = None) -> Allocation:
    """llama.cpp's ``ftype`` mix on ``problem``'s units, mapped onto its formats.

    ``fallback=True``: what llama-quantize writes for this model (k-quants replaced where
    a row is not a multiple of 256); ``False``: the plain per-tensor rules. ``bpw``
    overrides a format's bits per weight for the mapping (default: from the problem's
    bytes); ``formats`` restricts the candidates (e.g. to the symmetric ones: the mapping
    looks at bits only, not at whether a ggml type has an offset). Units the problem does
    not have are simply absent; fixed units keep their pinned formats.
    """
    unit_infos = infos_for(problem, infos)
    types = [tensor_type(i, ftype, model, fallback) for i in unit_infos]
    mapped = map_types(problem, types, bpw, formats, [i.row for i in unit_infos])
    choice = pin_fixed(problem, mapped)
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    ties_broken = [list(g) for g in problem.tie_groups if len({int(choice[u]) for u in g}) > 1]
    info = {
        "baseline": "llamacpp", "ftype": ftype, "fallback": fallback,
        "source": "llama.cpp src/llama-quant.cpp llama_tensor_get_type_impl + tensor_type_fallback",
        "ggml_types": dict(zip(problem.unit_names, types)), "type_counts": counts,
        "fallbacks": sum(1 for i, t in zip(unit_infos, types) if fallback and t != rule_type(i, ftype, model)),
        "mapping": {t: sorted({problem.format_names[int(f)] for s, f in zip(types, mapped) if s == t}) for t in sorted(counts)},
        "ties_broken": ties_broken,
        "real_types": sum(1 for f in mapped if ggml.format_type(problem.format_names[int(f)])),  # llama.cpp's own
    }
    name = f"llamacpp_{ftype}" + ("" if fallback else "_plain")
    return Allocation.of(problem, choice, solver=name, info=info)
