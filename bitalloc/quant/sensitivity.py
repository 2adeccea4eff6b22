"""NNCF's mixed-precision sensitivity scores, for the ``nncf`` baseline (``search.baselines``).

Ported from openvinotoolkit/nncf: ``nncf/quantization/algorithms/weight_compression/
mixed_precision.py`` (the criteria), ``weight_lowering.py`` (``get_integer_quantization_error``
and the integer quantization it runs), ``nncf/quantization/fake_quantize.py``
(``calculate_scale_zero_point``) and ``nncf/experimental/common/tensor_statistics/
collectors.py`` (the reducers and ``HAWQAggregator``). Every criterion measures weights
against the *backup* precision, INT8_ASYM per output channel, not against the primary:

* ``weight_quantization_error`` (data-free): ``1 / (e + eps)``, with
  ``e = max over output channels of mean over inputs of (dq(W) - W)^2`` and ``eps`` the
  machine epsilon of the weight's dtype;
* ``hessian_input_activation``: ``||dq(W) - W||_F`` times the HAWQ statistic of the
  layer's inputs (``HAWQAggregator``: per sample ``c = (c + sum(x^2)) / x.size``, then
  ``2 c / samples``; its own comment flags the formula as possibly wrong, it is ported
  as written, so it mostly reflects the last sample);
* ``mean_activation_variance`` / ``max_activation_variance`` / ``mean_activation_magnitude``:
  ``1 / (e + eps)`` times, per sample, the mean (max) over channels of the variance over
  tokens, or the mean over channels of the max |x| over tokens, averaged over samples.

NNCF's default with a dataset is ``max_activation_variance``; without, the data-free one.
A sample is one calibration window (NNCF feeds its dataset one item at a time), and the
first ``subset_size`` (NNCF's default 128) are used. :func:`hessian_activation_from_hessian`
is the cheaper stand-in from the profile's ``H = X^T X``: twice the mean squared input
activation over all calibration tokens (what the aggregator's comment intends).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitalloc.quant.device import module_device, to_device
from bitalloc.quant.progress import ProgressFn
from bitalloc.quant.units import Unit, is_transposed_conv1d, weight_matrix

if TYPE_CHECKING:
    from bitalloc.quant.stream import StreamedModel

CRITERIA = ("weight_quantization_error", "hessian_input_activation", "mean_activation_variance",
            "max_activation_variance", "mean_activation_magnitude")
DATA_FREE = "weight_quantization_error"
DEFAULT_WITH_DATA = "max_activation_variance"
SUBSET_SIZE = 128


def int8_asym(w: torch.Tensor) -> torch.Tensor:
    """NNCF's backup precision (INT8_ASYM, one scale and zero point per output row), dequantized.

    ``scale = (max - min) / 255`` (machine epsilon where smaller), ``zp = clip(-round(min /
    scale), 0, 255)``, ``q = clip(round(w / scale + zp), 0, 255)``, ``w' = (q - zp) * scale``.
    """
    w = w.float()
    low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale = (high - low) / 255
    eps = torch.finfo(torch.float32).eps
    scale = torch.where(scale.abs() < eps, torch.full_like(scale, eps), scale)
    zero_point = (0 - torch.round(low / scale)).to(torch.int32).clamp(0, 255).float()
    q = torch.clamp(torch.round(w / scale + zero_point), 0, 255)
    return (q - zero_point) * scale


def weight_quantization_error(w: torch.Tensor) -> float:
    """``get_integer_quantization_error`` for INT8_ASYM: the worst row's mean squared error."""
    diff = (int8_asym(w) - w.float()) ** 2
    return float(diff.mean(dim=1).max())


def int8_error_norm(w: torch.Tensor) -> float:
    """``HAWQCriterion``'s weight term: the Frobenius norm of the INT8_ASYM error."""
    return float(torch.linalg.norm(int8_asym(w) - w.float()))


@dataclass
class ActivationStats:
    """NNCF's aggregated input statistics of one layer (see the module docstring)."""

    hessian_input_activation: float
    mean_activation_variance: float
    max_activation_variance: float
    mean_activation_magnitude: float
    samples: int


class _Collector:
    """Per-sample reductions of one layer's inputs, aggregated as NNCF aggregates them."""

    def __init__(self) -> None:
        self.hawq = torch.zeros((), dtype=torch.float64)
        self.mean_var: list[float] = []
        self.max_var: list[float] = []
        self.mean_abs_max: list[float] = []

    def add(self, x: torch.Tensor) -> None:
        """One sample ``x`` of shape ``[1, tokens, K]`` (reduction axis -2: the tokens)."""
        x = x.double()
        self.hawq = (self.hawq + (x * x).sum()) / x.numel()
        variance = x.var(dim=-2, correction=0)
        self.mean_var.append(float(variance.mean()))
        self.max_var.append(float(variance.max()))
        self.mean_abs_max.append(float(x.abs().amax(dim=-2).mean()))

    def stats(self) -> ActivationStats:
        n = len(self.mean_var)
        if n == 0:
            raise ValueError("no calibration sample reached this layer")
        return ActivationStats(float(self.hawq * 2 / n), sum(self.mean_var) / n, sum(self.max_var) / n,
                               sum(self.mean_abs_max) / n, n)


def _samples(x: torch.Tensor) -> list[torch.Tensor]:
    """A batch of layer inputs as NNCF's samples ``[1, tokens, K]`` (2-D inputs: one token each)."""
    if x.dim() == 2:
        x = x.unsqueeze(1)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return [x[b:b + 1] for b in range(x.shape[0])]


def activation_statistics(model: nn.Module, units: Sequence[Unit], batches: Iterable[torch.Tensor | dict], *,
                          subset_size: int | None = SUBSET_SIZE,
                          progress: ProgressFn | None = None) -> dict[str, ActivationStats]:
    """NNCF's input statistics of every weight unit over the first ``subset_size`` samples."""
    modules = dict(model.named_modules())
    names = [u.name for u in units if u.kind == "weight"]
    batches = list(batches)
    taken = 0
    with recording(modules, names, subset_size) as collectors, torch.no_grad():
        for i, batch in enumerate(batches):
            if subset_size is not None and taken >= subset_size:
                break
            batch = to_device(batch, module_device(model))
            model(**batch) if isinstance(batch, dict) else model(batch)
            first = next(iter(batch.values())) if isinstance(batch, dict) else batch
            taken += len(first)
            if progress:
                progress(i + 1, len(batches), "nncf statistics")
    return {name: c.stats() for name, c in collectors.items()}


@contextlib.contextmanager
def recording(modules: Mapping[str, nn.Module], names: Sequence[str],
              subset_size: int | None = SUBSET_SIZE) -> Iterator[dict[str, _Collector]]:
    """Hooks that gather NNCF's input statistics of the units ``names`` while the model runs, each
    over the first ``subset_size`` samples it is handed (every unit sees the batches in the same
    order, so a model run whole or block by block gathers the same samples)."""
    for name in names:
        if not (isinstance(modules[name], nn.Linear) or is_transposed_conv1d(modules[name])):
            raise ValueError(f"{name}: NNCF's data-aware criteria are defined for MatMul (Linear) layers only, "
                             f"not {type(modules[name]).__name__}")
    collectors = {name: _Collector() for name in names}
    seen = dict.fromkeys(names, 0)

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            for sample in _samples(args[0].detach()):
                if subset_size is None or seen[name] < subset_size:
                    collectors[name].add(sample)
                seen[name] += 1
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        yield collectors
    finally:
        for handle in handles:
            handle.remove()


def hessian_activation_from_hessian(hessian: torch.Tensor, tokens: int) -> float:
    """The HAWQ activation term from ``H = X^T X``: ``2 * tr(H) / (tokens * K)``.

    Twice the mean squared input over all calibration tokens and channels: what NNCF's
    aggregator computes when every sample is alike, without its last-sample weighting.
    """
    return 2.0 * float(torch.diagonal(hessian).double().sum()) / (tokens * hessian.shape[0])


def nncf_score(w: torch.Tensor, criterion: str, stats: ActivationStats | float | None = None) -> float:
    """One layer's NNCF sensitivity; ``stats`` is its :class:`ActivationStats` (or, for
    ``hessian_input_activation``, the activation term as a number)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: unknown NNCF sensitivity metric {criterion!r}; known: {', '.join(CRITERIA)}")
    if criterion == "hessian_input_activation":
        if stats is None:
            raise ValueError("hessian_input_activation needs activation statistics")
        activation = stats if isinstance(stats, (int, float)) else stats.hessian_input_activation
        return int8_error_norm(w) * float(activation)
    inverse_error = 1.0 / (weight_quantization_error(w) + torch.finfo(w.dtype).eps)
    if criterion == DATA_FREE:
        return inverse_error
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"{criterion} needs activation statistics")
    return inverse_error * float(getattr(stats, criterion))


def nncf_scores(model: nn.Module, units: Sequence[Unit], criterion: str = DEFAULT_WITH_DATA,
                batches: Iterable[torch.Tensor | dict] | None = None, *,
                hessians: Mapping[str, torch.Tensor] | None = None, tokens: int | None = None,
                stats: Mapping[str, ActivationStats] | None = None,
                subset_size: int | None = SUBSET_SIZE, progress: ProgressFn | None = None) -> dict[str, float]:
    """``{unit name: score}`` for every weight unit under an NNCF criterion.

    Data-based criteria read ``batches`` (model inputs), or ``stats`` already collected by
    :func:`activation_statistics` (one pass serves every criterion);
    ``hessian_input_activation`` may instead take the profile's ``hessians`` and the
    calibration ``tokens`` they summed (:func:`hessian_activation_from_hessian`).
    """
    modules = dict(model.named_modules())
    weights = [u for u in units if u.kind == "weight"]
    activation: Mapping[str, ActivationStats | float] = {}
    if criterion != DATA_FREE:
        if stats is not None:
            activation = stats
        elif criterion == "hessian_input_activation" and hessians is not None and batches is None:
            if not tokens:
                raise ValueError("tokens: the number of calibration tokens the hessians sum is needed")
            activation = {u.name: hessian_activation_from_hessian(hessians[u.name], tokens) for u in weights}
        elif batches is None:
            raise ValueError(f"criterion {criterion!r} needs calibration batches (NNCF: a dataset)")
        else:
            activation = activation_statistics(model, weights, batches, subset_size=subset_size, progress=progress)
    with torch.no_grad():
        return {u.name: nncf_score(weight_matrix(modules[u.name]).detach(), criterion, activation.get(u.name))
                for u in weights}


def streamed_nncf_scores(model: StreamedModel, units: Sequence[Unit], batches: Sequence[torch.Tensor],
                         criterion: str = DEFAULT_WITH_DATA, *, subset_size: int | None = SUBSET_SIZE,
                         progress: ProgressFn | None = None) -> dict[str, float]:
    """:func:`nncf_scores` of a model streamed block by block (``quant.stream``): each block's
    units gather their input statistics while the calibration batches walk through it and are
    scored while its weights are read; units after the blocks (the head) see the last hidden
    states through the model's own final layers."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: unknown NNCF sensitivity metric {criterion!r}; known: {', '.join(CRITERIA)}")
    modules = dict(model.module.named_modules())
    members: dict[int | None, list[str]] = {}
    for unit in units:
        if unit.kind == "weight":
            members.setdefault(model.block_of(unit.name), []).append(unit.name)
    data = criterion != DATA_FREE
    scores: dict[str, float] = {}

    @contextlib.contextmanager
    def scored(names: list[str]) -> Iterator[None]:
        with recording(modules, names if data else [], subset_size) as collectors:
            yield
        with torch.no_grad():
            scores.update({name: nncf_score(weight_matrix(modules[name]).detach(), criterion,
                                            collectors[name].stats() if data else None) for name in names})

    def visit(index: int, _block: nn.Module) -> contextlib.AbstractContextManager:
        if progress:
            progress(index, len(model.blocks), "nncf statistics")
        return scored(members.get(index, []))

    last = model.walk(list(batches), visit)
    if members.get(None):
        with scored(members[None]), torch.no_grad():
            for batch, step in zip(batches, last):
                with model.bypassed(step.hidden):
                    model.module(batch.to(model.device))
    return scores
