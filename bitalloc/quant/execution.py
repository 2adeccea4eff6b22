"""The one place a model is run forward on token windows with an allocation applied.

Everything that scores a model's output (held-out evaluation, the fitness measure of measured
search, the ``kl`` and ``kv_kl`` metrics, descent's KL gradient) asks ``logits`` for it, so a
model held whole and a model streamed block by block (``quant.stream``) are scored the same way:

* whole: the allocation is applied to the module (``simulation.applied``, ``kv_sim.kv_applied``)
  for as long as the batches run, then put back;
* streamed: the batches' hidden states pass from block to block, each block read from the
  checkpoint with its own units quantized (and the simulated KV cache, when the allocation
  quantizes caches, handed to every block), then the head runs on the last hidden states.
  A whole walk serves every batch, so the boundary states of all of them are kept (windows x
  tokens x hidden size: megabytes where the weights are gigabytes). GPTQ's Hessians come block
  by block (``hessian.BlockHessians``): the calibration batches walk beside the scored ones
  through each block as read, before its units are quantized.

``logits`` is a generator that holds the allocation applied while it is suspended: consume it
to the end or close it (``contextlib.closing``) so that the weights are put back at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from bitalloc.quant.device import module_device
from bitalloc.quant.hessian import BlockHessians, Hessians, HessianWalk
from bitalloc.quant.kv_sim import kv_applied
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.quantizers import Method
from bitalloc.quant.simulation import QuantizedWeights, applied
from bitalloc.quant.stream import StreamedModel


def model_logits(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits (float32) for a batch of token windows, without a KV cache, on the module's device."""
    batch = batch.to(module_device(module))
    output = module(batch, use_cache=False) if hasattr(module, "config") else module(batch)
    return (output.logits if hasattr(output, "logits") else output).float()


def logits(model: LoadedModel, batches: Sequence[torch.Tensor], allocation: Mapping[str, str] | None = None, *,
           method: Method = "rtn", hessians: Hessians | BlockHessians | None = None,
           cache: QuantizedWeights | None = None) -> Iterator[torch.Tensor]:
    """Each batch's float32 logits with ``allocation`` (unit -> format name, weights and KV caches)
    applied; nothing applied when it is None or empty. Gradients flow where the caller enables
    them, on a model held whole. ``hessians`` are GPTQ's: summed already, or, for a streamed
    model, ``BlockHessians`` to sum block by block."""
    allocation = dict(allocation or {})
    if not batches:
        return
    if isinstance(model, StreamedModel):
        yield from _streamed(model, batches, allocation, method, hessians, cache)
        return
    if isinstance(hessians, BlockHessians):
        raise TypeError("BlockHessians are summed while a streamed model is walked: give a model held whole "
                        "its Hessians (hessian.calibration_hessians)")
    with (applied(model, allocation, method=method, hessians=hessians, cache=cache),
          kv_applied(model, allocation)):
        for batch in batches:
            yield model_logits(model.module, batch)


def _streamed(model: StreamedModel, batches: Sequence[torch.Tensor], allocation: dict[str, str], method: Method,
              hessians: Hessians | BlockHessians | None, cache: QuantizedWeights | None) -> Iterator[torch.Tensor]:
    """``logits`` of a model streamed block by block: the weights of one block at a time."""
    if torch.is_grad_enabled():
        raise ValueError("gradients cannot flow through a model streamed block by block yet (descent needs them): "
                         "give a --max-memory the weights fit in")
    prefixes = [model.block_prefix(index) for index in range(len(model.blocks))]
    beside = HessianWalk(model, hessians) if isinstance(hessians, BlockHessians) else None

    def of_block(index: int) -> dict[str, str]:
        return {name: fmt for name, fmt in allocation.items() if name.startswith(prefixes[index])}

    @contextlib.contextmanager
    def quantized(index: int, block: nn.Module) -> Iterator[None]:
        sums = hessians if beside is None else beside.step(index, block)
        with applied(model, of_block(index), method=method, hessians=sums, cache=cache):
            yield

    # The KV units' cache rides in the keyword arguments every block is handed: captured with the
    # first block's inputs, it is the cache each block's attention writes its layer into.
    with kv_applied(model, allocation):
        states = model.walk(list(batches), quantized)
    outside = {name: fmt for name, fmt in allocation.items()
               if not name.startswith((*prefixes, "kv."))}
    for batch, state in zip(batches, states):
        # Applied per batch, and put back before the batch's logits are handed out: the caller may
        # run another walk of the same model between two batches (the reference, say).
        with model.bypassed(state.hidden), applied(model, outside, method=method, hessians=hessians, cache=cache):
            out = model_logits(model.module, batch)
        yield out
