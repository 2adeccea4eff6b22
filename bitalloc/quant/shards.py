"""A streamed profile split into block-range shards, and merged back into one error table.

Once a metric's shared quantities are known (``metrics.streamed.StreamedMetric.shared``: nothing
for ``output_mse``, each unit's trace or output Fisher for the gradient metrics), each block's
rows depend on that block alone, given the hidden states that enter it. A shard recomputes
those by running the blocks before its range forward (one forward pass per block, cheap beside
the cells of every unit in every format), so shards share nothing but the shared quantities.

Shards run one after another in this process today, which is what the embedded service does;
``merge`` refuses a missing or duplicated shard rather than write a profile with holes, so a
runner that spreads them over workers can hand back whatever it collected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.streamed import block_rows, streamed_metric
from bitalloc.quant.stream import StreamedModel


@dataclass(frozen=True)
class Shard:
    """Block range ``blocks`` of a streamed model: shard ``index`` of a plan."""

    index: int
    blocks: range


@dataclass
class ShardRows:
    """What one shard measured: the rows (indices among the weight units) and their cells."""

    shard: int
    rows: list[int]
    error: np.ndarray


def plan(blocks: int, count: int) -> list[Shard]:
    """``count`` contiguous block ranges of near-equal length covering ``blocks`` blocks."""
    if not 1 <= count <= blocks:
        raise ValueError(f"shards must be between 1 and the model's {blocks} decoder blocks, got {count}")
    bounds = [round(k * blocks / count) for k in range(count + 1)]
    return [Shard(k, range(bounds[k], bounds[k + 1])) for k in range(count)]


def merge(shards: list[Shard], parts: list[ShardRows], units: int, formats: int) -> np.ndarray:
    """The error table from every shard's rows: refused when a shard is missing or came twice,
    or when the rows do not cover every unit exactly once."""
    seen = sorted(part.shard for part in parts)
    if seen != [shard.index for shard in shards]:
        raise ValueError(f"cannot merge a profile from shards {seen}: the plan has shards 0-{len(shards) - 1}, each once")
    rows = sorted(r for part in parts for r in part.rows)
    if rows != list(range(units)):
        raise ValueError(f"the shards' rows do not cover the {units} weight units exactly once")
    errors = np.zeros((units, formats))
    for part in parts:
        errors[part.rows] = part.error
    return errors


def sharded_errors(ctx: ProfilingContext, metric: str, shards: int = 1) -> np.ndarray:
    """The weight rows of a streamed profile (``ctx.model`` a ``StreamedModel``), the shared
    quantities first, then ``shards`` block ranges one after another."""
    method = streamed_metric(ctx, metric)
    model: StreamedModel = ctx.model  # type: ignore[assignment]
    shared = method.shared(ctx)
    layout = plan(len(model.blocks), shards)
    parts = []
    for shard in layout:
        phase = f"{metric} (streamed" + (f", shard {shard.index + 1}/{shards})" if shards > 1 else ")")
        parts.append(ShardRows(shard.index, *block_rows(ctx, method, shared, shard.blocks, phase)))
    return merge(layout, parts, len(ctx.weight_units), len(ctx.formats))
