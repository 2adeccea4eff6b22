"""KV-cache units: what a K or V cache costs per token in a format.

Layouts follow KIVI (Liu et al., 2024): keys are quantized per channel, in groups of
``group_size`` consecutive tokens (key outliers live in fixed channels); values per token,
in groups of ``group_size`` channels within a head. Codes are packed at ``bits`` per
element; each group keeps a float16 scale (and an offset when asymmetric). A per-channel
(``_pc``) key format amortises its scales over the whole context, so they cost nothing
per token; a per-channel value format keeps one scale per token and head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bitalloc.quant.formats import SCALE_BYTES, Format, IntFormat
from bitalloc.quant.units import Unit


@dataclass(frozen=True)
class KVOptions:
    """Include the KV caches as units, costed at ``context`` tokens for ``batch`` sequences."""

    context: int = 4096
    batch: int = 1


def kv_bytes_per_token(unit: Unit, fmt: Format) -> float:
    """Bytes one cached token costs in ``unit`` (a ``kv_key`` or ``kv_value`` unit) stored in ``fmt``."""
    if unit.kind not in ("kv_key", "kv_value"):
        raise ValueError(f"{unit.name} is not a KV unit")
    heads, head_dim = unit.shape
    if fmt.is_keep:
        return heads * head_dim * 2
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"KV caches take integer formats or 16-bit, not {fmt.name}")
    per_group = SCALE_BYTES * (1 if fmt.symmetric else 2)
    codes = heads * head_dim * fmt.bits / 8
    if unit.kind == "kv_key":
        scales = 0.0 if fmt.group_size is None else heads * head_dim * per_group / fmt.group_size
    else:
        groups = 1 if fmt.group_size is None else math.ceil(head_dim / fmt.group_size)
        scales = heads * groups * per_group
    return codes + scales
