"""``output_mse``: the layer-wise reconstruction error ``tr(dW H dW^T)`` per calibration token.

With ``H = X^T X`` from the calibration inputs this is exactly the squared error the
perturbation ``dW = Q(W) - W`` adds to the layer's outputs, summed over output channels and
averaged over tokens (GPTQ/OBQ; HIGGS's linearity theorem ties it to the loss increase).
One forward pass collects every ``H``; each unit x format cell is then a matrix product.
"""

from __future__ import annotations

import numpy as np
import torch

from bitalloc.quant.metrics.context import ProfilingContext


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` as ``sum((dW H) * dW)``: one matmul instead of a triple product."""
    return float(((dw @ hessian) * dw).sum(dtype=torch.float64))


def output_mse(ctx: ProfilingContext) -> np.ndarray:
    units = ctx.weight_units
    hessians = ctx.hessians
    samples = ctx.calibration.samples
    errors = np.zeros((len(units), len(ctx.formats)))
    for i, unit in enumerate(units):
        w = ctx.weight(unit)
        for j, fmt in enumerate(ctx.formats):
            errors[i, j] = output_error(ctx.quantized(unit, fmt) - w, hessians[unit.name]) / samples
        ctx.progress(i + 1, len(units), "output_mse")
    return errors
