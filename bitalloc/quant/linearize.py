"""The measured KL, linearised around an allocation: what changing one unit's format would
do to it, given every other unit as the allocation has it.

Why: a profile predicts each unit's KL alone, around the 16-bit model, and the solver adds
the predictions up. Quantised together, units interact: on SmolLM2 the units an exact
solver pushes to low widths cost 1.3-1.9 times their prediction in the mix and the ones it
keeps wide far less, so the proxy optimum is not the measured one. The gradient of the
measured KL at the allocation, dotted with the weight change that a format swap makes, is
that swap's first-order effect *in context*, interactions included; one backward pass over
a few calibration windows gives it for every unit and format at once.

    linear[i, f] = < dKL/dW_i at the allocation, Q_f(W_i) - Q_a(W_i) >

with ``a`` the unit's format in the allocation (so ``linear[i, a] = 0``). ``search``'s
``descent`` solver turns these cells into proximal steps, each checked by measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from bitalloc.quant.evaluate import Assignment, Evaluator, kl_sum
from bitalloc.quant.execution import logits, model_logits
from bitalloc.quant.hessian import BlockHessians, Hessians, HessianWalk
from bitalloc.quant.kv_sim import kv_applied
from bitalloc.quant.metrics.fisher_mse import frozen
from bitalloc.quant.quantizers import Method
from bitalloc.quant.simulation import applied, simulated
from bitalloc.quant.stream import StreamedModel
from bitalloc.quant.units import as_matrix, weight_matrix


class KLGradient:
    """Linear cells ``[units, formats]`` of the KL from the 16-bit model around an allocation.

    The KL is the mean over next-token positions of ``evaluator``'s windows (give it
    calibration text, not the evaluation split); ``unit_names`` and ``format_names`` are
    the rows and columns of the search problem, ``allowed`` its mask (other cells, and
    units without a weight such as KV caches, are 0). Quantized weights come from the
    evaluator's weight cache when it has one.
    """

    def __init__(self, evaluator: Evaluator, unit_names: Sequence[str], format_names: Sequence[str],
                 allowed: np.ndarray, *, method: Method = "rtn",
                 hessians: Hessians | BlockHessians | None = None) -> None:
        self.evaluator, self.method, self.hessians = evaluator, method, hessians
        self.unit_names, self.format_names, self.allowed = list(unit_names), list(format_names), allowed
        modules = dict(evaluator.model.module.named_modules())
        self.modules = {name: modules[name] for name in self.unit_names if name in modules}

    def gradients(self, allocation: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """``dKL/dW`` (as ``[N, K]`` matrices) of every weight unit, with ``allocation`` applied."""
        evaluator = self.evaluator
        model = evaluator.model.module
        weights = {name: module.weight for name, module in self.modules.items()}
        batches = evaluator.batches()
        positions = sum(batch[:, 1:].numel() for batch in batches)
        try:
            with frozen(model):
                for w in weights.values():
                    w.requires_grad_(True)
                    w.grad = None
                quantized = logits(evaluator.model, batches, allocation, method=self.method, hessians=self.hessians,
                                   cache=evaluator.weights)
                with contextlib.closing(quantized):
                    for reference, out in zip(evaluator.reference_log_probs(batches), quantized):
                        (kl_sum(reference, torch.log_softmax(out[:, :-1], dim=-1)) / positions).backward()
                return {name: as_matrix(self.modules[name], w.grad).detach().clone() for name, w in weights.items()}
        finally:
            for w in weights.values():
                w.grad = None

    def __call__(self, assignment: Assignment) -> np.ndarray:
        """The cells around ``assignment`` (a ``search.Allocation``): descent's ``LinearModel``."""
        allocation = assignment.formats
        if isinstance(self.evaluator.model, StreamedModel):
            return self._streamed(allocation)
        gradients = self.gradients(allocation)
        cells = np.zeros((len(self.unit_names), len(self.format_names)))
        for name, grad in gradients.items():
            self._fill(cells, name, grad, allocation)
        return cells

    def _fill(self, cells: np.ndarray, name: str, grad: torch.Tensor, allocation: Mapping[str, str],
              hessians: Hessians | None = None) -> None:
        """Unit ``name``'s row: its gradient dotted with each allowed format's weight change (the
        module holds the unit's 16-bit weight); GPTQ's ``hessians`` are its block's when streamed."""
        i = self.unit_names.index(name)
        cache = self.evaluator.weights
        hessians = self.hessians if hessians is None else hessians
        weight = weight_matrix(self.modules[name]).detach()
        grad = grad.float()
        here = simulated(weight, name, allocation[name], self.method, hessians, cache)
        for j, format_name in enumerate(self.format_names):
            if self.allowed[i, j] and format_name != allocation[name]:
                there = simulated(weight, name, format_name, self.method, hessians, cache)
                cells[i, j] = float((grad * (there - here)).sum(dtype=torch.float64))

    def _streamed(self, allocation: Mapping[str, str]) -> np.ndarray:
        """The cells of a model streamed block by block: forward with the allocation applied block by
        block, keeping the boundary states, the KL's gradient in the last hidden states, then back
        down the blocks, each run again (quantized) from its input state so that one
        ``autograd.grad`` gives its units' weight gradients, which fill their rows while the block
        is read, and the gradient handed below. Under GPTQ the calibration windows walk the
        unquantized blocks beside the forward pass, each block's Hessians summed just before it
        is quantized; the calibration states entering each block are kept too (spilled like the
        boundary states), so the backward pass sums the block's Hessians again instead of holding
        every block's."""
        model: StreamedModel = self.evaluator.model  # type: ignore[assignment]
        walk = HessianWalk(model, self.hessians) if isinstance(self.hessians, BlockHessians) else None
        calibration = model.boundary_states()
        batches = self.evaluator.batches()
        positions = sum(batch[:, 1:].numel() for batch in batches)
        prefixes = [model.block_prefix(i) for i in range(len(model.blocks))]
        cells = np.zeros((len(self.unit_names), len(self.format_names)))
        references = list(self.evaluator.reference_log_probs(batches))

        def of_block(index: int) -> dict[str, str]:
            return {n: f for n, f in allocation.items() if n.startswith(prefixes[index]) and n in self.modules}

        def loss(b: int, batch: torch.Tensor) -> torch.Tensor:
            return kl_sum(references[b], torch.log_softmax(model_logits(model.module, batch)[:, :-1], dim=-1)) / positions

        @contextlib.contextmanager
        def quantized(index: int, block: nn.Module, hessians: Hessians | None = None) -> Iterator[Hessians | None]:
            """Block ``index`` (read, still 16-bit) quantized as the allocation says; under GPTQ its
            Hessians come from the calibration walk (the first pass) or are given (the second)."""
            if walk is not None and hessians is None:
                calibration.append(walk.entering)
                hessians = walk.step(index, block)
            with applied(model, of_block(index), method=self.method, hessians=hessians, cache=self.evaluator.weights):
                yield hessians

        with kv_applied(model, allocation), calibration:
            inputs, states, grads = model.walk_to_head(batches, loss, quantized)
            with states:  # the spill files, if any, go with them
                for i in reversed(range(len(model.blocks))):
                    units = of_block(i)
                    with model.materialized(i) as block:
                        entering = states[i]  # read once: a spilled boundary comes from disk
                        hessians = walk.again(i, block, calibration[i]) if walk is not None else None
                        weights = {name: self.modules[name].weight for name in units}
                        sums = {name: torch.zeros_like(w) for name, w in weights.items()}
                        with quantized(i, block, hessians), frozen(model.module):
                            for w in weights.values():
                                w.requires_grad_(True)
                            for b, step in enumerate(inputs):
                                hidden = entering[b].detach().requires_grad_()
                                found = torch.autograd.grad(step.run(block, hidden), [hidden, *weights.values()],
                                                            grad_outputs=grads[b], allow_unused=True)
                                grads[b] = found[0]
                                for total, grad in zip(sums.values(), found[1:]):
                                    if grad is not None:
                                        total += grad
                        for name, total in sums.items():  # the block's 16-bit weights are back
                            self._fill(cells, name, as_matrix(self.modules[name], total), allocation, hessians)
                    del states[i + 1]
                    if walk is not None:
                        del calibration[i]
        return cells
