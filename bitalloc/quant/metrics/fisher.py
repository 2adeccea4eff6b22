"""``fisher``: the diagonal empirical Fisher weighted perturbation,

    error(unit, format) = sum_i F_i (Q(W) - W)_i^2,   F = mean over windows of (dL_w / dW)^2,

with ``L_w`` the next-token loss of one calibration window. The empirical Fisher is the
cheap stand-in for the Hessian's diagonal (one backward pass per window, no second
derivatives), so this is the diagonal second-order estimate of the loss increase (without
the 1/2, like ``hessian_trace``). Unlike ``hessian_trace``'s average trace it weighs each
weight by its own curvature, so it sees whether a format's error lands on the weights
that matter. A window is one example: squaring per-window gradients (not one gradient of
the whole batch) is what makes ``F`` a Fisher rather than the square of the mean gradient,
which vanishes at a minimum.
"""

from __future__ import annotations

import numpy as np
import torch

from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.loss import as_matrix, differentiable, next_token_loss, unit_weights


def fisher_diagonals(ctx: ProfilingContext) -> list[torch.Tensor]:
    """Per weight unit, ``F`` in the unit's ``[N, K]`` matrix view (float32)."""
    weights = unit_weights(ctx)
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    windows = ctx.calibration.inputs
    with differentiable(weights):
        for n, window in enumerate(windows):
            loss = next_token_loss(ctx.module, window[None].to(weights[0].device))
            for f, g in zip(fisher, torch.autograd.grad(loss, weights)):
                f += g.float() ** 2
            ctx.progress(n + 1, len(windows), "fisher")
    modules = [ctx.modules[u.name] for u in ctx.weight_units]
    return [as_matrix(m, f / len(windows)) for m, f in zip(modules, fisher)]


def fisher(ctx: ProfilingContext) -> np.ndarray:
    return diagonal_errors(ctx, fisher_diagonals(ctx))


def diagonal_errors(ctx: ProfilingContext, diagonals: list[torch.Tensor]) -> np.ndarray:
    """Each weight unit's cells, ``sum F (Q(W) - W)^2``, from its ``F`` in the ``[N, K]`` view."""
    units = ctx.weight_units
    errors = np.zeros((len(units), len(ctx.formats)))
    for i, unit in enumerate(units):
        w = ctx.weight(unit)
        f = diagonals[i].to(w.device)
        for j, fmt in enumerate(ctx.formats):
            errors[i, j] = float((f * (ctx.quantized(unit, fmt) - w) ** 2).sum(dtype=torch.float64))
    return errors
