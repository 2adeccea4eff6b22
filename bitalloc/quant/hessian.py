"""Input second moments ``H = X^T X`` of every weight unit, from one pass over calibration data.

``H`` is the Hessian of the layer-wise error ``||(W_hat - W) X^T||^2`` (up to a factor 2),
so ``tr(dW H dW^T)`` is the summed squared output error a perturbation ``dW`` causes on the
calibration tokens: what ``output_mse`` reports and what GPTQ minimises. Units that read
the same input (a tie group such as q/k/v) share one matrix, computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.progress import ProgressFn
from bitalloc.quant.units import Unit, UnitSet, is_transposed_conv1d


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows ``[tokens, K]`` matching ``weight_matrix``'s columns."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if not isinstance(module, nn.Conv2d):
            raise NotImplementedError(f"{type(module).__name__} inputs are not supported for Hessians yet")
        patches = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if is_transposed_conv1d(module) or isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    raise TypeError(f"no input view for {type(module).__name__}")


def collect_hessians(
    model: nn.Module,
    units: Sequence[Unit],
    batches: Iterable[torch.Tensor | dict],
    *,
    tie_groups: Sequence[Sequence[str]] = (),
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """``{unit name: H}`` (float32 ``[K, K]``, summed over all calibration tokens).

    ``batches`` are model inputs: token-id tensors for a language model, or argument
    dicts. Members of a tie group get the same tensor object as their group's first unit.
    """
    modules = dict(model.named_modules())
    leader = {name: group[0] for group in tie_groups for name in group}
    owners = [u.name for u in units if u.kind == "weight" and leader.get(u.name, u.name) == u.name]
    hessians: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            rows = _input_rows(module, args[0].detach()).float()
            # float32 products per batch (fast), float64 running sum (no drift over many batches).
            update = (rows.T @ rows).double()
            hessians[name] = update if name not in hessians else hessians[name] + update
        return accumulate

    for name in owners:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    batches = list(batches)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                model(**batch) if isinstance(batch, dict) else model(batch)
                if progress:
                    progress(i + 1, len(batches), "hessians")
    finally:
        for handle in handles:
            handle.remove()
    result = {name: h.float() for name, h in hessians.items()}
    for unit in units:
        if unit.kind == "weight" and unit.name not in result and leader.get(unit.name) in result:
            result[unit.name] = result[leader[unit.name]]
    return result


def calibration_hessians(model: nn.Module, units: UnitSet, calibration: CalibrationSet, *,
                         batch_size: int = 4, progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """``collect_hessians`` for a unit set (its tie groups shared) over a calibration set."""
    return collect_hessians(model, units.weights, calibration.batches(batch_size),
                            tie_groups=units.tie_groups, progress=progress)
