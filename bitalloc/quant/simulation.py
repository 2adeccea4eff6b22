"""An allocation applied to a model in simulation: each unit's weight replaced by what its
format would store (``quantizers.simulate``: RTN, GPTQ, llama.cpp's own quantizers), and put
back afterwards; ``QuantizedWeights`` keeps the simulated cells for the next allocation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch

from bitalloc.quant.formats import get_format
from bitalloc.quant.hessian import Hessians
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.quantizers import Method, simulate, uses_importance
from bitalloc.quant.units import set_weight_matrix, weight_matrix


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
