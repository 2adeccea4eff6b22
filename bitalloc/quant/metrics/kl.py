"""``kl``: the measured ground truth. Each cell is the KL divergence of the model's next-token
distribution from the unquantized model's, on calibration tokens, when that unit alone is
quantized to that format (by the profile's method), exactly as ``Evaluator.evaluate``
scores the one-unit allocation.

One model pass per cell makes it the most expensive metric by far, and the one the proxies
are judged against. Options (``ctx.options``) bound the cost:

* ``units``: glob patterns of the weight units to measure (default: all);
* ``formats``: names of the formats to measure (default: all);
* ``kl_tokens``: how many calibration tokens to score at most (default: all): as many whole
  windows as fit, from the first; one window cut to the budget when a window is longer.

Cells left out are NaN, so nobody mistakes them for a measured zero.
"""

from __future__ import annotations

import fnmatch

import numpy as np

from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.evaluate import Evaluator
from bitalloc.quant.hessian import BlockHessians
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.stream import StreamedModel


def kl_windows(calibration: CalibrationSet, tokens: int | None) -> CalibrationSet:
    """The leading calibration windows that fit in ``tokens`` (at least one, cut to fit)."""
    if tokens is None:
        return calibration
    if tokens < 2:
        raise ValueError(f"kl_tokens must be at least 2, got {tokens}")
    windows, length = calibration.inputs.shape
    length = min(length, tokens)
    count = min(windows, tokens // length)
    return calibration.head(count, length)


def kl_evaluator(ctx: ProfilingContext) -> Evaluator:
    """An ``Evaluator`` on the ``kl_tokens`` budget of the calibration windows."""
    return Evaluator(ctx.model, kl_windows(ctx.calibration, ctx.options.get("kl_tokens")), batch_size=ctx.batch_size)


def _chosen(ctx: ProfilingContext) -> tuple[list[int], list[int]]:
    """Indices of the weight units and formats that ``ctx.options`` asks to measure."""
    patterns = ctx.options.get("units")
    units = list(range(len(ctx.weight_units)))
    if patterns is not None:
        units = [i for i in units if any(fnmatch.fnmatchcase(ctx.weight_units[i].name, p) for p in patterns)]
        if not units:
            raise ValueError(f"kl option units={patterns!r} matches no weight unit")
    names = ctx.options.get("formats")
    position = {f.name: j for j, f in enumerate(ctx.formats)}
    if names is None:
        return units, list(position.values())
    unknown = [n for n in names if n not in position]
    if unknown:
        raise ValueError(f"kl option formats names {unknown}, which the profile does not have ({list(position)})")
    return units, [position[n] for n in names]


def kl(ctx: ProfilingContext) -> np.ndarray:
    rows, columns = _chosen(ctx)
    errors = np.full((len(ctx.weight_units), len(ctx.formats)), np.nan)
    evaluator = kl_evaluator(ctx)
    hessians = None
    if ctx.method == "gptq":  # a streamed model's Hessians are summed block by block as each cell is scored
        hessians = BlockHessians(ctx.units, ctx.calibration) if isinstance(ctx.model, StreamedModel) else ctx.hessians
    done, total = 0, len(rows) * len(columns)
    for i in rows:
        name = ctx.weight_units[i].name
        for j in columns:
            result = evaluator.evaluate({name: ctx.formats[j].name}, method=ctx.method, hessians=hessians)
            errors[i, j] = result.kl
            done += 1
            ctx.progress(done, total, "kl")
    return errors
