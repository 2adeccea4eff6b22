"""How good an allocation really is: apply it in simulation and score the model on held-out
windows against its own 16-bit self.

Scores: perplexity of the next token (and the unquantized model's, on the same tokens), KL divergence of the next-token distribution from
the unquantized model's (mean over positions), top-1 agreement with it, plus the
allocation's bytes and average bits. A uniform allocation is just another allocation, so
baselines are the same call. ``Evaluator`` caches the unquantized model's log-probabilities
(within a memory budget), so scoring many allocations of one model (a front, a refinement
loop) runs the reference once. Both sides run through ``quant.execution.logits``: a model held
whole or streamed block by block is scored the same way.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np
import torch

from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.execution import logits
from bitalloc.quant.formats import get_format
from bitalloc.quant.hessian import BlockHessians, Hessians
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.quantizers import Method
from bitalloc.quant.simulation import QuantizedWeights
from bitalloc.quant.stream import StreamedModel
from bitalloc.quant.units import Unit, UnitSet


@dataclass
class Evaluation:
    perplexity: float
    kl: float
    top1: float
    tokens: int
    seconds: float
    reference_perplexity: float
    bytes: int | None = None
    avg_bits: float | None = None
    window_kl: tuple[float, ...] = ()  # the KL of each window alone: how much of ``kl`` one window carries

    def to_dict(self) -> dict:
        return asdict(self)


def kl_sum(reference: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) summed over positions, from both sides' log-probabilities
    (float64 sum; differentiable in ``log_probs``)."""
    return (reference.exp() * (reference - log_probs)).sum(dtype=torch.float64)


class Evaluator:
    """Scores a causal LM against its unquantized self on fixed token windows.

    The reference is the model with nothing applied: a copy of the module when the model is
    held whole (the allocation under test changes the module's weights while the reference's
    log-probabilities may still be needed), the checkpoint itself when the model is streamed
    (it is read anew, never changed)."""

    def __init__(self, model: LoadedModel, windows: CalibrationSet, *, batch_size: int = 4, cache_bytes: float = 2e9,
                 weight_cache_bytes: float = 0.0):
        if not model.is_causal_lm:
            raise ValueError(f"{model.spec} is not a causal language model; evaluation needs next-token logits")
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        self.reference = model if isinstance(model, StreamedModel) else replace(model, module=copy.deepcopy(model.module).eval())
        self._cache: dict[tuple[int, int], torch.Tensor] = {}  # by (batch index, windows in it)
        self._cache_left = cache_bytes
        self.weights = QuantizedWeights(weight_cache_bytes) if weight_cache_bytes else None

    def batches(self, max_windows: int | None = None) -> list[torch.Tensor]:
        inputs = self.windows.inputs if max_windows is None else self.windows.inputs[:max_windows]
        return list(inputs.split(self.batch_size))

    def reference_log_probs(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The 16-bit model's next-token log-probabilities for each of ``batches`` (the first
        batches of the windows), from the cache where it holds them."""
        keys = [(index, len(batch)) for index, batch in enumerate(batches)]  # a smaller max_windows: a shorter last batch
        missing = [batch for key, batch in zip(keys, batches) if key not in self._cache]
        with contextlib.closing(logits(self.reference, missing)) as computed:
            for key in keys:
                if key in self._cache:
                    yield self._cache[key]
                    continue
                with torch.no_grad():  # never held across a yield: the caller may need gradients (descent)
                    log_probs = window_log_probs(next(computed))
                size = log_probs.numel() * log_probs.element_size()
                if size <= self._cache_left:
                    self._cache[key] = log_probs
                    self._cache_left -= size
                yield log_probs

    def evaluate(self, allocation: Mapping[str, str], *, method: Method = "rtn",
                 hessians: Hessians | BlockHessians | None = None, units: UnitSet | None = None,
                 max_windows: int | None = None) -> Evaluation:
        """Score ``allocation`` (weights and KV caches; an empty one scores the model as it is);
        with ``units`` also report its weights' exact bytes and average bits."""
        start = time.perf_counter()
        batches = self.batches(max_windows)
        nll = reference_nll = agree = 0.0
        count = 0
        window_kl: list[float] = []
        quantized = logits(self.model, batches, allocation, method=method, hessians=hessians, cache=self.weights)
        with contextlib.closing(quantized), torch.no_grad():
            for batch, reference, out in zip(batches, self.reference_log_probs(batches), quantized):
                # One window at a time: the [positions x vocabulary] temporaries of a large vocabulary
                # are held for one window, never for the batch.
                for tokens, r, window_logits in zip(batch, reference, out):
                    q = torch.log_softmax(window_logits[:-1], dim=-1)
                    targets = tokens[1:].unsqueeze(-1).to(q.device)
                    nll += float(-q.gather(-1, targets).sum(dtype=torch.float64))
                    reference_nll += float(-r.gather(-1, targets).sum(dtype=torch.float64))
                    window_kl.append(float(kl_sum(r, q)) / r.shape[0])
                    agree += float((r.argmax(-1) == q.argmax(-1)).sum())
                    count += targets.numel()
                    del q
                del out
        kl = max(math.fsum(window_kl) / len(window_kl), 0.0)  # every window has the same length
        result = Evaluation(math.exp(nll / count), kl, agree / count, count, round(time.perf_counter() - start, 3),
                            math.exp(reference_nll / count), window_kl=tuple(window_kl))
        if units is not None:
            result.bytes, result.avg_bits = allocation_size(units.weights, allocation)
        return result


def window_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[windows, positions - 1, vocabulary]`` of a batch's logits,
    computed window by window into one tensor (a batch-sized temporary is never made beside it)."""
    result = torch.empty_like(logits[:, :-1])
    for index, window in enumerate(logits):
        result[index] = torch.log_softmax(window[:-1], dim=-1)
    return result


def allocation_size(units: list[Unit], allocation: Mapping[str, str]) -> tuple[int, float]:
    """Exact bytes and average bits of the weight units an allocation covers (others at 16 bits)."""
    total = sum(get_format(allocation.get(u.name, "bf16")).nbytes(u.shape) for u in units)
    return total, 8.0 * total / sum(u.numel for u in units)


def uniform(units: list[Unit], format_name: str) -> dict[str, str]:
    """Every weight unit in one format: the baseline every allocation must beat."""
    return {u.name: format_name for u in units}


class Assignment(Protocol):
    """Anything with a unit -> format map, such as ``search.Allocation`` (which ``quant`` does
    not import: ``search`` and ``quant`` stand beside each other)."""

    @property
    def formats(self) -> Mapping[str, str]: ...


class MeasuredKL:
    """A measure for the search (``search.Measure``): the KL of an allocation on each of the
    first ``ceil(samples / window length)`` windows of ``evaluator``.

    The windows are the evaluator's, in order, so a larger sample count sees a superset of
    what a smaller one saw and the same (allocation, samples) always measures the same.
    Give it windows the result will not be judged on (e.g. calibration text at random
    offsets, ``quant.calibration.calibration_tokens``): a search that selects on a few
    fixed windows fits their noise, so judge its answer on held-out text.
    """

    def __init__(self, evaluator: Evaluator, *, method: Method = "rtn",
                 hessians: Hessians | BlockHessians | None = None) -> None:
        self.evaluator, self.method, self.hessians = evaluator, method, hessians
        self.window = evaluator.windows.inputs.shape[-1]

    def __call__(self, allocation: Assignment, samples: int) -> np.ndarray:
        """The KL of each window measured; their mean is ``evaluation(...).kl``."""
        return np.asarray(self.evaluation(allocation, samples).window_kl)

    def evaluation(self, allocation: Assignment, samples: int) -> Evaluation:
        windows = min(max(1, math.ceil(samples / self.window)), len(self.evaluator.windows.inputs))
        return self.evaluator.evaluate(allocation.formats, method=self.method, hessians=self.hessians,
                                       max_windows=windows)
