"""A streamed profile split into block-range shards, and merged back into one error table.

Once a metric's shared quantities are known (``metrics.streamed.StreamedMetric.shared``: nothing
for ``output_mse``, each unit's trace or output Fisher for the gradient metrics), each block's
rows depend on that block alone, given the hidden states that enter it.

One forward walk gives the hidden states entering each shard's first block (its boundary
states), so a shard runs only its own blocks. Who runs the shards is a ``ShardRunner``'s
choice: ``in_sequence`` runs them one after another in this process (the CLI);
``service.shards`` makes each one a job that any worker may take, the parent's own included.
A shard's inputs (the shared quantities and its boundary states) travel as bytes
(``encode_inputs``), its rows come back as bytes (``encode_rows``), and ``merge`` refuses a
missing or duplicated shard rather than write a profile with holes. The boundary states of
every shard are held at once: a calibration set whose states do not fit beside one block is
not split yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.streamed import Shared, block_rows, streamed_metric
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


Measure = Callable[[Shard], ShardRows]
"""A shard's rows, measured in this process on the parent's own context."""

Inputs = Callable[[Shard], bytes]
"""What a shard needs beyond the job's spec, as bytes another process reads (``encode_inputs``)."""


class ShardRunner(Protocol):
    def __call__(self, layout: list[Shard], inputs: Inputs, measure: Measure) -> list[ShardRows]:
        """Every shard of ``layout`` measured once, by ``measure`` here or by another process that
        rebuilds the context from the job and the shard's ``inputs`` (``shard_rows``)."""


def in_sequence(layout: list[Shard], inputs: Inputs, measure: Measure) -> list[ShardRows]:
    """The shards one after another, in this process."""
    return [measure(shard) for shard in layout]


def encode_inputs(shared: Shared, entry: list[torch.Tensor]) -> bytes:
    """A shard's inputs as safetensors bytes (no pickle: another worker reads them): the metric's
    shared quantities and the hidden states entering the shard's first block, one per batch."""
    tensors = {f"shared.{name}": t for name, t in shared.items()}
    tensors.update({f"entry.{k}": t for k, t in enumerate(entry)})
    return save_tensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def decode_inputs(data: bytes) -> tuple[Shared, list[torch.Tensor]]:
    tensors = load_tensors(data)
    shared = {name.removeprefix("shared."): t for name, t in tensors.items() if name.startswith("shared.")}
    entry = [tensors[f"entry.{k}"] for k in range(sum(name.startswith("entry.") for name in tensors))]
    return shared, entry


def encode_rows(part: ShardRows) -> bytes:
    return save_tensors({"shard": torch.tensor([part.shard]), "rows": torch.tensor(part.rows, dtype=torch.int64),
                         "error": torch.from_numpy(np.ascontiguousarray(part.error, dtype=np.float64))})


def decode_rows(data: bytes) -> ShardRows:
    tensors = load_tensors(data)
    return ShardRows(int(tensors["shard"]), tensors["rows"].tolist(), tensors["error"].numpy())


def shard_rows(ctx: ProfilingContext, metric: str, shard: Shard, shared: Shared, entry: list[torch.Tensor],
               shards: int) -> ShardRows:
    """One shard's rows on ``ctx`` (a streamed model's context), from the hidden states ``entry``
    entering its first block."""
    method = streamed_metric(ctx, metric)
    phase = f"{metric} (streamed" + (f", shard {shard.index + 1}/{shards})" if shards > 1 else ")")
    return ShardRows(shard.index, *block_rows(ctx, method, shared, shard.blocks, phase, entry))


def sharded_errors(ctx: ProfilingContext, metric: str, shards: int = 1, runner: ShardRunner = in_sequence
                   ) -> np.ndarray:
    """The weight rows of a streamed profile (``ctx.model`` a ``StreamedModel``): the shared
    quantities and the hidden states entering each shard first, then ``shards`` block ranges,
    run by ``runner``."""
    method = streamed_metric(ctx, metric)
    model: StreamedModel = ctx.model  # type: ignore[assignment]
    shared = method.shared(ctx)
    layout = plan(len(model.blocks), shards)
    entries = model.entry_states(ctx.batches(), [shard.blocks.start for shard in layout])
    parts = runner(layout, lambda shard: encode_inputs(shared, entries[shard.blocks.start]),
                   lambda shard: shard_rows(ctx, metric, shard, shared, entries[shard.blocks.start], shards))
    return merge(layout, parts, len(ctx.weight_units), len(ctx.formats))
