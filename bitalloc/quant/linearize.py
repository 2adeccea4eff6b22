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
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bitalloc.quant.evaluate import Assignment, Evaluator, kl_sum
from bitalloc.quant.execution import logits
from bitalloc.quant.hessian import Hessians
from bitalloc.quant.metrics.fisher_mse import frozen
from bitalloc.quant.quantizers import Method
from bitalloc.quant.simulation import simulated
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
                 hessians: Hessians | None = None) -> None:
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
        gradients = self.gradients(allocation)
        cells = np.zeros((len(self.unit_names), len(self.format_names)))
        cache = self.evaluator.weights
        for i, name in enumerate(self.unit_names):
            if name not in gradients:
                continue
            weight = weight_matrix(self.modules[name]).detach()
            grad = gradients[name].float()
            here = simulated(weight, name, allocation[name], self.method, self.hessians, cache)
            for j, format_name in enumerate(self.format_names):
                if self.allowed[i, j] and format_name != allocation[name]:
                    there = simulated(weight, name, format_name, self.method, self.hessians, cache)
                    cells[i, j] = float((grad * (there - here)).sum(dtype=torch.float64))
        return cells
