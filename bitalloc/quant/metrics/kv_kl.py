"""``kv_kl``: the error of the KV units, measured. A cell is the KL divergence of the
next-token distribution from the unquantized model's on calibration tokens when the K cache
(or the V cache) of one attention layer alone is held in an integer format, simulated
through the transformers cache (``quant.kv_sim``). A 16-bit cache is the model as it runs:
its cell is 0 by definition. Formats a cache cannot take (not integer, not 16-bit) are NaN;
the profile masks them out.

It shares ``kl``'s ``kl_tokens`` budget (``ctx.options``): one model pass per cell.
"""

from __future__ import annotations

import numpy as np

from bitalloc.quant.formats import IntFormat
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.kl import kl_evaluator
from bitalloc.quant.units import Unit


def kv_errors(ctx: ProfilingContext, kv_units: list[Unit]) -> np.ndarray:
    """``[len(kv_units), formats]`` measured KL; called by ``build_profile`` for the KV rows."""
    errors = np.full((len(kv_units), len(ctx.formats)), np.nan)
    keep = [j for j, f in enumerate(ctx.formats) if f.is_keep]
    integer = [j for j, f in enumerate(ctx.formats) if isinstance(f, IntFormat)]
    errors[:, keep] = 0.0
    if not kv_units or not integer:
        return errors
    evaluator = kl_evaluator(ctx)
    done, total = 0, len(kv_units) * len(integer)
    for i, unit in enumerate(kv_units):
        for j in integer:
            errors[i, j] = evaluator.evaluate({unit.name: ctx.formats[j].name}).kl
            done += 1
            ctx.progress(done, total, "kv_kl")
    return errors
