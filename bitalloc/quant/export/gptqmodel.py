"""GPTQModel: a ``quantize_config.json`` whose ``dynamic`` rules give each module its bits and group size.

The base ``bits``/``group_size`` are those of the format covering the most weights; every
module in another format gets a ``"+:regex"`` rule and every 16-bit module a ``"-:regex"``
rule (skipped). GPTQModel (``QuantizeConfig.dynamic_get``) and vLLM/SGLang
(``gptq_utils.get_dynamic_override``) both take the first rule whose regex ``re.match``-es
the module name, negative rules first; the regexes here are anchored at both ends so each
names exactly its modules.

Tie groups: vLLM loads q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` and looks
the fused name up in ``dynamic``, so a tie group's rule also matches that name, and a tie
group split across formats is refused (the fused layer can hold one only).

Expressible: symmetric ``int{2,3,4,8}`` with groups of 16 to 128 or per channel (``-1``),
the widths and groups GPTQModel's portable torch kernel and vLLM's GPTQ kernels run. GPTQ's
symmetric grid is bitalloc's (scale ``2 * absmax / (2**b - 1)``, zero point ``2**(b-1)``).
Refused: 5 and 6 bits, asymmetric grids (GPTQ stores integer zero points, bitalloc float16
offsets), float and NormalFloat formats, and quantized KV caches (GPTQModel quantizes weights
only).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bitalloc.quant.export.base import (
    Exporter,
    ExportError,
    ExportRequest,
    Problems,
    json_bytes,
    refuse_split_tie_groups,
)
from bitalloc.quant.formats import Format, IntFormat
from bitalloc.quant.units import Unit

TARGET = "GPTQModel"
BITS = (2, 3, 4, 8)
GROUP_SIZES = (16, 32, 64, 128)
# The fused module vLLM builds from a tie group's members (by their last name component).
FUSED = {frozenset({"q_proj", "k_proj", "v_proj"}): "qkv_proj", frozenset({"gate_proj", "up_proj"}): "gate_up_proj"}


def gptq_settings(fmt: Format) -> dict[str, int] | str:
    """``{"bits", "group_size"}`` for a quantized ``fmt``, or why GPTQ cannot hold it."""
    if not isinstance(fmt, IntFormat):
        return f"{fmt.name}: GPTQ checkpoints hold integer codes only"
    if not fmt.symmetric:
        return (f"{fmt.name}: GPTQ's asymmetric grids store integer zero points (w = (q - z) * s); "
                f"bitalloc stores a float16 offset per group (w = q * s + m)")
    if fmt.bits not in BITS:
        return f"{fmt.name}: GPTQ kernels (GPTQModel's torch kernel, vLLM) run {'/'.join(map(str, BITS))} bits"
    group = -1 if fmt.group_size is None else fmt.group_size
    if group != -1 and group not in GROUP_SIZES:
        return f"{fmt.name}: GPTQModel's kernels take groups of {'/'.join(map(str, GROUP_SIZES))} or per channel"
    return {"bits": fmt.bits, "group_size": group}


def module_regex(names: Sequence[str]) -> str:
    """An anchored regex matching exactly ``names``, plus vLLM's fused name when they form one."""
    if len(names) == 1:
        return f"^{re.escape(names[0])}$"
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        return "^(?:" + "|".join(map(re.escape, names)) + ")$"
    leaves = [n.rpartition(".")[2] for n in names]
    fused = FUSED.get(frozenset(leaves))
    parent = parents.pop()
    alternatives = "|".join(map(re.escape, leaves + ([fused] if fused else [])))
    return f"^{re.escape(parent)}\\.(?:{alternatives})$"


def _rule_sets(request: ExportRequest) -> list[list[Unit]]:
    """The weight units in rule-sized sets: each tie group together, every other unit alone."""
    by_name = {u.name: u for u in request.weights}
    tied = {name for group in request.tie_groups for name in group}
    sets = [[by_name[n] for n in group if n in by_name] for group in request.tie_groups]
    return [s for s in sets if s] + [[u] for u in request.weights if u.name not in tied]


def build(request: ExportRequest) -> bytes:
    problems = Problems(TARGET)
    settings: dict[str, dict[str, int]] = {}
    for unit in request.weights:
        fmt = request.format_of(unit)
        if fmt.is_keep:
            continue
        result = gptq_settings(fmt)
        if isinstance(result, str):
            problems.add(result, unit.name)
        else:
            settings[fmt.name] = result
    refuse_split_tie_groups(request, problems, "vLLM and SGLang load them as one fused layer with one config")
    for unit in request.kv_units:
        if not request.format_of(unit).is_keep:
            problems.add(f"{request.format_of(unit).name} KV cache: GPTQModel quantizes weights only", unit.name)
    problems.raise_if_any()
    quantized = [u for u in request.weights if not request.format_of(u).is_keep]
    if not quantized:
        raise ExportError(f"{TARGET}: every unit is 16-bit, so there is nothing to quantize")
    base = request.base_format(quantized)
    dynamic: dict[str, dict[str, Any]] = {}
    for members in _rule_sets(request):
        fmt = request.format_of(members[0])
        regex = module_regex([u.name for u in members])
        if fmt.is_keep:
            dynamic[f"-:{regex}"] = {}
        elif fmt.name != base.name:
            dynamic[f"+:{regex}"] = dict(settings[fmt.name])
    config = {
        **settings[base.name],
        "sym": True,
        "desc_act": False,
        "lm_head": any(u.name == "lm_head" for u in quantized),
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "dynamic": dynamic,
        "meta": {"bitalloc": dict(request.provenance)},
    }
    return json_bytes(config)


EXPORTER = Exporter(
    name="gptqmodel", filename="quantize_config.json", media_type="application/json",
    description="GPTQModel quantize_config.json: base bits/group size plus per-module dynamic overrides; "
                "16-bit modules skipped.",
    build=build,
)
