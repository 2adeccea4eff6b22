"""How good an allocation really is: apply it in simulation and score the model on held-out
windows against its own 16-bit self.

Scores: perplexity of the next token (and the unquantized model's, on the same tokens), KL divergence of the next-token distribution from
the unquantized model's (mean over positions), top-1 agreement with it, plus the
allocation's bytes and average bits. A uniform allocation is just another allocation, so
baselines are the same call. ``Evaluator`` keeps a copy of the unquantized model and caches
its log-probabilities (within a memory budget), so scoring many allocations of one model
(a front, a refinement loop) runs the reference once.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.device import module_device
from bitalloc.quant.formats import get_format
from bitalloc.quant.hessian import Hessians
from bitalloc.quant.kv_sim import kv_applied
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.quantizers import Method, simulate, uses_importance
from bitalloc.quant.units import Unit, UnitSet, set_weight_matrix, weight_matrix


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


def model_logits(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits (float32) for a batch of token windows, without a KV cache, on the module's device."""
    batch = batch.to(module_device(module))
    output = module(batch, use_cache=False) if hasattr(module, "config") else module(batch)
    return (output.logits if hasattr(output, "logits") else output).float()


def kl_sum(reference: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) summed over positions, from both sides' log-probabilities
    (float64 sum; differentiable in ``log_probs``)."""
    return (reference.exp() * (reference - log_probs)).sum(dtype=torch.float64)


@contextlib.contextmanager
def applied(
    model: LoadedModel,
    allocation: Mapping[str, str],
    *,
    method: Method = "rtn",
    hessians: Hessians | None = None,
    cache: QuantizedWeights | None = None,
) -> Iterator[None]:
    """Run the model with each weight unit of ``allocation`` (unit -> format name) quantized.

    The original weights are put back on exit, even after an error, so one loaded model
    serves any number of evaluations. KV units in the allocation are left to
    ``quant.kv_sim.kv_applied``. ``cache`` keeps quantized weights for the next call. Under
    ``gptq`` the calibration ``hessians`` fit GPTQ, and give llama.cpp's types their importance matrix.
    """
    modules = dict(model.module.named_modules())
    saved: dict[str, torch.Tensor] = {}
    try:
        for name, format_name in allocation.items():
            if name.startswith("kv."):
                continue
            if name not in modules:
                raise KeyError(f"allocation names unit {name!r}, which the model does not have")
            saved[name] = modules[name].weight.detach().clone()
            weight = weight_matrix(modules[name]).detach()
            set_weight_matrix(modules[name], simulated(weight, name, format_name, method, hessians, cache))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)


def simulated(weight: torch.Tensor, name: str, format_name: str, method: Method,
              hessians: Hessians | None, cache: QuantizedWeights | None) -> torch.Tensor:
    """Unit ``name``'s 16-bit weight matrix as ``format_name`` stores it, from ``cache`` when it holds it."""

    def quantize() -> torch.Tensor:
        fmt = get_format(format_name)
        hessian = hessians.get(name) if hessians else None
        importance = hessians.importance(name) if hessian is not None and uses_importance(fmt, method) else None
        return simulate(weight.float(), fmt, method, hessian, importance)

    return quantize() if cache is None else cache.get((name, format_name, method), quantize)


class QuantizedWeights:
    """Simulated weights by (unit, format, method), kept within a byte budget.

    A front, a refinement loop or a benchmark scores many allocations that share most of
    their cells; GPTQ in particular costs far more than a forward pass, so each cell is
    quantized once. The weights are deterministic given the model and the Hessians, so
    one cache must serve one model and one calibration set.
    """

    def __init__(self, max_bytes: float = 2e9) -> None:
        self._weights: dict[tuple[str, str, str], torch.Tensor] = {}
        self._left = max_bytes

    def get(self, key: tuple[str, str, str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._weights:
            return self._weights[key]
        weight = compute()
        size = weight.numel() * weight.element_size()
        if size <= self._left:
            self._weights[key] = weight
            self._left -= size
        return weight


class Evaluator:
    """Scores a causal LM against its unquantized self on fixed token windows."""

    def __init__(self, model: LoadedModel, windows: CalibrationSet, *, batch_size: int = 4, cache_bytes: float = 2e9,
                 weight_cache_bytes: float = 0.0):
        if not model.is_causal_lm:
            raise ValueError(f"{model.spec} is not a causal language model; evaluation needs next-token logits")
        self.model = model
        self.windows = windows
        self.batch_size = batch_size
        self.reference = copy.deepcopy(model.module).eval()
        self._cache: dict[tuple[int, int], torch.Tensor] = {}  # by (batch index, windows in it)
        self._cache_left = cache_bytes
        self.weights = QuantizedWeights(weight_cache_bytes) if weight_cache_bytes else None

    def reference_log_probs(self, index: int, batch: torch.Tensor) -> torch.Tensor:
        """The 16-bit model's next-token log-probabilities for batch ``index`` of the windows (cached)."""
        key = (index, len(batch))  # a smaller max_windows makes a shorter last batch
        if key in self._cache:
            return self._cache[key]
        with torch.no_grad():
            log_probs = torch.log_softmax(model_logits(self.reference, batch)[:, :-1], dim=-1)
        size = log_probs.numel() * log_probs.element_size()
        if size <= self._cache_left:
            self._cache[key] = log_probs
            self._cache_left -= size
        return log_probs

    def score(self, max_windows: int | None = None) -> Evaluation:
        """Score the model as it is now (wrap in ``applied(...)`` to score an allocation)."""
        start = time.perf_counter()
        inputs = self.windows.inputs if max_windows is None else self.windows.inputs[:max_windows]
        nll = reference_nll = agree = 0.0
        count = 0
        window_kl: list[float] = []
        with torch.no_grad():
            for index, batch in enumerate(inputs.split(self.batch_size)):
                reference = self.reference_log_probs(index, batch)
                log_probs = torch.log_softmax(model_logits(self.model.module, batch)[:, :-1], dim=-1)
                targets = batch[:, 1:].unsqueeze(-1).to(log_probs.device)
                nll += float(-log_probs.gather(-1, targets).sum(dtype=torch.float64))
                reference_nll += float(-reference.gather(-1, targets).sum(dtype=torch.float64))
                window_kl += [float(kl_sum(r, q)) / r.shape[0] for r, q in zip(reference, log_probs)]
                agree += float((reference.argmax(-1) == log_probs.argmax(-1)).sum())
                count += targets.numel()
        kl = max(math.fsum(window_kl) / len(window_kl), 0.0)  # every window has the same length
        return Evaluation(math.exp(nll / count), kl, agree / count, count, round(time.perf_counter() - start, 3),
                          math.exp(reference_nll / count), window_kl=tuple(window_kl))

    def evaluate(self, allocation: Mapping[str, str], *, method: Method = "rtn",
                 hessians: Hessians | None = None, units: UnitSet | None = None,
                 max_windows: int | None = None) -> Evaluation:
        """Score ``allocation`` (weights and KV caches); with ``units`` also report its weights' exact bytes and average bits."""
        with (applied(self.model, allocation, method=method, hessians=hessians, cache=self.weights),
              kv_applied(self.model, allocation)):
            result = self.score(max_windows)
        if units is not None:
            result.bytes, result.avg_bits = allocation_size(units.weights, allocation)
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
                 hessians: Hessians | None = None) -> None:
        self.evaluator, self.method, self.hessians = evaluator, method, hessians
        self.window = evaluator.windows.inputs.shape[-1]

    def __call__(self, allocation: Assignment, samples: int) -> np.ndarray:
        """The KL of each window measured; their mean is ``evaluation(...).kl``."""
        return np.asarray(self.evaluation(allocation, samples).window_kl)

    def evaluation(self, allocation: Assignment, samples: int) -> Evaluation:
        windows = min(max(1, math.ceil(samples / self.window)), len(self.evaluator.windows.inputs))
        return self.evaluator.evaluate(allocation.formats, method=self.method, hessians=self.hessians,
                                       max_windows=windows)
