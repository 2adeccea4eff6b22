"""What every metric needs, computed at most once per profile.

``cache`` (optional) keeps the quantized cells for other metrics and for evaluation of the
same model and calibration set: GPTQ cells cost far more than the metric around them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.formats import Format
from bitalloc.quant.hessian import Hessians, calibration_hessians
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.progress import ProgressFn, no_progress
from bitalloc.quant.quantizers import Method, simulate, uses_importance
from bitalloc.quant.simulation import QuantizedWeights
from bitalloc.quant.units import Unit, UnitSet, weight_matrix


@dataclass
class ProfilingContext:
    """A model, its units, the candidate formats and the calibration tokens of one profile."""

    model: LoadedModel
    units: UnitSet
    formats: list[Format]
    calibration: CalibrationSet
    method: Method = "rtn"
    batch_size: int = 4
    progress: ProgressFn = no_progress
    options: dict = field(default_factory=dict)
    cache: QuantizedWeights | None = None

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @functools.cached_property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.module.named_modules())

    @property
    def weight_units(self) -> list[Unit]:
        return self.units.weights

    def batches(self) -> list[torch.Tensor]:
        return self.calibration.batches(self.batch_size)

    @functools.cached_property
    def hessians(self) -> Hessians:
        """``H = X^T X`` per weight unit, from one pass over the calibration batches."""
        return calibration_hessians(self.module, self.units, self.calibration,
                                    batch_size=self.batch_size, progress=self.progress)

    def narrowed(self, units: UnitSet, hessians: dict[str, torch.Tensor]) -> "ProfilingContext":
        """The same profile for some of its units whose Hessians are already known (one block of a
        streamed model, summed over the same calibration): a metric run on it fills those units' rows only."""
        part = replace(self, units=units, progress=no_progress)
        # what the cached property would compute for the whole model
        part.__dict__["hessians"] = Hessians(hessians, self.calibration.samples)
        return part

    def weight(self, unit: Unit) -> torch.Tensor:
        return weight_matrix(self.modules[unit.name]).detach().float()

    def quantized(self, unit: Unit, fmt: Format) -> torch.Tensor:
        """The unit's weight in ``fmt`` by the profile's method (GPTQ uses the Hessian, and so does
        llama.cpp's importance matrix, its mean over the calibration tokens)."""
        hessian = self.hessians[unit.name] if self.method == "gptq" else None
        importance = self.hessians.importance(unit.name) if uses_importance(fmt, self.method) else None

        def compute() -> torch.Tensor:
            return simulate(self.weight(unit), fmt, self.method, hessian, importance)

        return compute() if self.cache is None else self.cache.get((unit.name, fmt.name, self.method), compute)
