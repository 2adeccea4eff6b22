"""compressed-tensors (llm-compressor, vLLM): the ``quantization_config`` of a Hugging Face config.json.

One config group per format, targeting the exact module names that take it; 16-bit units go
to ``ignore``. A format is written only where compressed-tensors' own ``QuantizationArgs``
reproduce bitalloc's grid:

* ``int{b}_g{G}`` / ``_pc`` (symmetric): ``type=int, symmetric=True`` with ``strategy=group``
  or ``channel``. Both put the scale at ``absmax / ((2**b - 1) / 2)`` on the codes
  ``-2**(b-1) .. 2**(b-1)-1``, the very grid of ``quant.formats.IntFormat``.
* ``fp8_e4m3`` (per channel or grouped): ``type=float, num_bits=8``, scale ``absmax / 448``.

Refused, with the reason: asymmetric integer grids (compressed-tensors stores an integer
zero point, bitalloc a float16 offset), ``nf4`` (no codebook type), ``fp6_e3m2``
(compressed-tensors' 6-bit float is E2M3), ``fp4_e2m1`` (its FP4 is NVFP4 or MXFP4, whose
scales are FP8 or powers of two), a group that does not divide a unit's K (compressed-tensors
quantizes whole groups only), and tie groups split across formats: vLLM loads q/k/v and
gate/up as one fused layer and gives it the scheme of its first shard.

KV units: compressed-tensors has a single ``kv_cache_scheme`` for every layer's K and V, and
bitalloc's integer KV layouts (keys per channel, values per token) are two different
schemes, so a quantized KV cache is refused; a 16-bit one needs no scheme.
"""

from __future__ import annotations

from typing import Any

from bitalloc.quant.export.base import (
    Exporter,
    ExportError,
    ExportRequest,
    Problems,
    format_family,
    json_bytes,
    refuse_split_tie_groups,
)
from bitalloc.quant.formats import Format, GgmlFormat, IntFormat

TARGET = "compressed-tensors"
# compressed-tensors' compressor for each kind of weight-only group (what infer_module_format picks).
PACKED, NAIVE = "pack-quantized", "naive-quantized"


# Format families compressed-tensors has no faithful QuantizationArgs for, and why.
REFUSED = {
    "nf4": "compressed-tensors has no NormalFloat codebook (its types are int and float)",
    "fp6_e3m2": "compressed-tensors' 6-bit float is E2M3 (MXFP6), whose levels differ from E3M2",
    "fp4_e2m1": ("compressed-tensors' 4-bit floats are NVFP4 (groups of 16, FP8 scales and a global scale) or "
                 "MXFP4 (groups of 32, power-of-two scales); bitalloc's fp4_e2m1 has float16 scales"),
}


def weight_args(fmt: Format) -> dict[str, Any] | str:
    """The ``QuantizationArgs`` (as a dict) that reproduce a quantized ``fmt``, or why there are none."""
    family = format_family(fmt)
    if isinstance(fmt, GgmlFormat):
        return f"{fmt.name}: a llama.cpp (ggml) block type, which compressed-tensors does not hold; export it for llama.cpp"
    if family in REFUSED:
        return f"{fmt.name}: {REFUSED[family]}"
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        return (f"{fmt.name}: compressed-tensors' asymmetric grids store an integer zero point "
                f"(w = (q - z) * s); bitalloc stores a float16 offset per group (w = q * s + m)")
    strategy = {"strategy": "channel"} if fmt.group_size is None else {"strategy": "group", "group_size": fmt.group_size}
    kind = "int" if isinstance(fmt, IntFormat) else "float"  # what is left: symmetric int, fp8_e4m3
    return {"num_bits": fmt.bits, "type": kind, "symmetric": True, "dynamic": False, **strategy}


def build(request: ExportRequest) -> bytes:
    problems = Problems(TARGET)
    groups: dict[str, dict[str, Any]] = {}
    ignore: list[str] = []
    for unit in request.weights:
        fmt = request.format_of(unit)
        if fmt.is_keep:
            ignore.append(unit.name)
            continue
        args = weight_args(fmt)
        if isinstance(args, str):
            problems.add(args, unit.name)
        elif fmt.group_size is not None and unit.shape[1] % fmt.group_size:
            problems.add(f"{fmt.name}: K is not a multiple of {fmt.group_size} (compressed-tensors quantizes "
                         f"whole groups only)", f"{unit.name} (K={unit.shape[1]})")
        else:
            group = groups.setdefault(fmt.name, {"targets": [], "weights": args,
                                                 "format": PACKED if args["type"] == "int" else NAIVE})
            group["targets"].append(unit.name)
    refuse_split_tie_groups(request, problems, "vLLM fuses them into one layer, which takes one scheme")
    _check_kv(request, problems)
    problems.raise_if_any()
    if not groups:
        raise ExportError(f"{TARGET}: every unit is 16-bit, so there is nothing to quantize")
    formats = {group["format"] for group in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "config_groups": {f"group_{i}": group for i, (_, group) in enumerate(sorted(groups.items()))},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    return json_bytes(config)


def _check_kv(request: ExportRequest, problems: Problems) -> None:
    """A quantized KV cache has no faithful ``kv_cache_scheme``; say whether it also varies by layer."""
    quantized = [u for u in request.kv_units if not request.format_of(u).is_keep]
    if not quantized:
        return
    names = sorted({request.format_of(u).name for u in request.kv_units})
    if len(names) > 1:
        reason = (f"KV formats vary by layer or by K/V ({', '.join(names)}): compressed-tensors has one "
                  f"kv_cache_scheme for every layer's K and V")
    else:
        reason = (f"{names[0]} KV cache: bitalloc quantizes keys per channel and values per token, two schemes "
                  f"that compressed-tensors' single kv_cache_scheme cannot hold (vLLM reads only FP8 ones)")
    for unit in quantized:
        problems.add(reason, unit.name)


EXPORTER = Exporter(
    name="compressed-tensors", filename="quantization_config.json", media_type="application/json",
    description="quantization_config for llm-compressor / vLLM: one config group per format, exact targets, "
                "16-bit units ignored.",
    build=build,
)
