"""Input second moments ``H = X^T X`` of every weight unit, from one pass over calibration data.

``H`` is the Hessian of the layer-wise error ``||(W_hat - W) X^T||^2`` (up to a factor 2),
so ``tr(dW H dW^T)`` is the summed squared output error a perturbation ``dW`` causes on the
calibration tokens: what ``output_mse`` reports and what GPTQ minimises. Units that read
the same input (a tie group such as q/k/v) share one matrix, computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitalloc.quant.calibration import CalibrationSet
from bitalloc.quant.device import module_device, to_device
from bitalloc.quant.progress import ProgressFn
from bitalloc.quant.quantizers import importance_matrix
from bitalloc.quant.units import Unit, UnitSet, is_transposed_conv1d

if TYPE_CHECKING:
    from bitalloc.quant.stream import BlockInputs, StreamedModel


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


class HessianSums:
    """Hooks that sum ``X^T X`` over every input a set of modules sees, while they are installed.

    Used as a context manager around forward passes: of the whole model (``collect_hessians``),
    or of one decoder block at a time (``quant.stream``). Members of a tie group get the same
    tensor object as their group's first unit: one hook, one matrix.
    """

    def __init__(self, modules: Mapping[str, nn.Module], units: Sequence[Unit],
                 tie_groups: Sequence[Sequence[str]] = ()) -> None:
        self.modules = modules
        self.units = [u for u in units if u.kind == "weight"]
        self.leader = {name: group[0] for group in tie_groups for name in group}
        self.sums: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            rows = _input_rows(module, args[0].detach()).float()
            # A float32 running sum, added in place: a float64 one would double the largest matrix a
            # block holds (down_proj's, intermediate x intermediate) for a drift far below the
            # cells' own noise (tens of batches, each summed in float32 anyway).
            if name in self.sums:
                self.sums[name].addmm_(rows.T, rows)
            else:
                self.sums[name] = rows.T @ rows
        return accumulate

    def __enter__(self) -> "HessianSums":
        owners = [u.name for u in self.units if self.leader.get(u.name, u.name) == u.name]
        self._handles = [self.modules[name].register_forward_pre_hook(self._hook(name)) for name in owners]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def result(self) -> dict[str, torch.Tensor]:
        """``{unit name: H}`` in float32, tie-group members sharing their leader's matrix (handed over,
        not copied: call it once)."""
        result = {name: self.sums.pop(name) for name in list(self.sums)}
        for unit in self.units:
            if unit.name not in result and self.leader.get(unit.name) in result:
                result[unit.name] = result[self.leader[unit.name]]
        return result


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
    dicts, moved to the model's device as they are run.
    """
    device = module_device(model)
    batches = list(batches)
    with torch.no_grad(), HessianSums(dict(model.named_modules()), units, tie_groups) as sums:
        for i, batch in enumerate(batches):
            batch = to_device(batch, device)
            model(**batch) if isinstance(batch, dict) else model(batch)
            if progress:
                progress(i + 1, len(batches), "hessians")
    return sums.result()


class Hessians(dict):
    """``{unit name: H}`` and the number of calibration samples (``tokens``) each sum ran over.

    The count turns a sum into a mean: llama.cpp's importance matrix (``importance``) is the mean
    squared activation, and ggml's rounding depends on its exact float values (a global scale
    changes the weighted fit only through float rounding, yet that flips a few blocks), so the
    simulation and the imatrix file a GGUF build writes divide by this same count.
    """

    def __init__(self, sums: Mapping[str, torch.Tensor], tokens: int) -> None:
        super().__init__(sums)
        self.tokens = tokens

    def importance(self, name: str) -> torch.Tensor:
        """Unit ``name``'s importance matrix, as ``llama-quantize --imatrix`` reads it."""
        return importance_matrix(self[name], self.tokens)


@dataclass(frozen=True)
class BlockHessians:
    """GPTQ's calibration Hessians for a model streamed block by block, never held all at once:
    ``quant.execution`` walks the calibration batches through each unquantized block beside the
    batches it scores, and sums that block's Hessians just before its units are quantized. The
    sums are the ones ``calibration_hessians`` gives the model held whole."""

    units: UnitSet
    calibration: CalibrationSet
    batch_size: int = 4


class HessianWalk:
    """``BlockHessians``' calibration batches walked through a streamed model's unquantized blocks,
    one block at a time, beside whatever else reads them: ``step`` runs the batches through the
    block just read and returns its units' Hessians."""

    def __init__(self, model: StreamedModel, source: BlockHessians) -> None:
        self.source = source
        self.modules = dict(model.module.named_modules())
        self.inputs = model.block_inputs(source.calibration.batches(source.batch_size))
        self.members: dict[int, list[Unit]] = {}
        for unit in source.units.weights:
            if (index := model.block_of(unit.name)) is not None:
                self.members.setdefault(index, []).append(unit)

    @property
    def entering(self) -> list[torch.Tensor]:
        """The calibration hidden states entering the next block ``step`` runs (one per batch)."""
        return [step.hidden for step in self.inputs]

    def step(self, index: int, block: nn.Module) -> Hessians:
        hessians, self.inputs = self._run(index, block, self.inputs)
        return hessians

    def again(self, index: int, block: nn.Module, entering: list[torch.Tensor]) -> Hessians:
        """Block ``index``'s Hessians once more, from the calibration states that entered it
        (``entering`` as it was before its ``step``): for a second pass over the block, such as
        a backward walk, without holding every block's Hessians in between."""
        hessians, _ = self._run(index, block, [step.with_hidden(h) for step, h in zip(self.inputs, entering)])
        return hessians

    def _run(self, index: int, block: nn.Module, inputs: list[BlockInputs]) -> tuple[Hessians, list[BlockInputs]]:
        units = self.members.get(index, [])
        names = {u.name for u in units}
        groups = [g for g in self.source.units.tie_groups if g[0] in names]
        with HessianSums(self.modules, units, groups) as sums, torch.no_grad():
            outputs = [step.with_hidden(step.run(block)) for step in inputs]
        return Hessians(sums.result(), self.source.calibration.samples), outputs


def calibration_hessians(model: nn.Module, units: UnitSet, calibration: CalibrationSet, *,
                         batch_size: int = 4, progress: ProgressFn | None = None) -> Hessians:
    """``collect_hessians`` for a unit set (its tie groups shared) over a calibration set: every
    Linear unit of a language model sees each of its ``samples`` tokens once."""
    return Hessians(collect_hessians(model, units.weights, calibration.batches(batch_size),
                                     tie_groups=units.tie_groups, progress=progress), calibration.samples)
