"""``fisher_mse``: the layer-wise reconstruction error weighted, per output channel, by how
much the model's output distribution depends on that channel: a prediction of the KL
divergence that quantizing one unit causes,

    error(unit, format) = 1/2 * sum_n G_n * (dW H dW^T)_nn / samples,

with ``H = X^T X`` the unit's input second moments (as in ``output_mse``) and ``G_n`` the
mean squared gradient of ``log p(y)`` with respect to the unit's output channel ``n``, for
labels ``y`` *sampled from the model itself*.

Why: ``output_mse`` measures every unit's output error in its own units, so it cannot
compare a value projection with an MLP down projection (measured on SmolLM2: within one
format its rank correlation with the real KL was 0.05-0.3). Sampling ``y`` from the
model makes ``E[g g^T]`` the Fisher of the model's own distribution, which is the Hessian
of the KL at the unquantized weights, so ``1/2 dY^T F dY`` is the second-order KL that an
output perturbation ``dY`` causes (HIGGS's linearity theorem is the same statement per
layer). Keeping the diagonal of ``F`` over output channels and averaging it over positions
(a Kronecker factorisation, as K-FAC does) reduces the cell to one matrix product, the
cost of ``output_mse``; the gradients take one backward pass per calibration batch.
Because every cell is an estimate of the same quantity (KL in nats per token) on the
same scale, cells of different units, and the KV cache's measured KL, add up.

The score function has zero mean under sampled labels and samples at different
positions are independent, so squaring the gradient of the summed log-likelihood of a
whole window estimates the per-position Fisher without bias; one label draw per position
suffices at calibration sizes (thousands of positions per channel).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.units import Unit


def log_probs_of(module: nn.Module, batch: torch.Tensor, tokens: bool) -> torch.Tensor:
    """Log-probabilities ``[positions, classes]``: next tokens of a window, or a classifier's classes."""
    output = module(batch, use_cache=False) if tokens else module(batch)
    logits = output.logits if hasattr(output, "logits") else output
    if tokens:
        logits = logits[:, :-1]
    return torch.log_softmax(logits.float().flatten(0, -2), dim=-1)


def sampled_score(log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The summed log-likelihood of labels drawn from the model's own distribution (one per position)."""
    labels = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).to(log_probs.device)
    return log_probs.gather(-1, labels).sum()


def channel_squares(module: nn.Module, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The per-channel sum of squares (float64, on the CPU) of an output gradient, and its row count."""
    flat = _channels_last(module, grad.detach()).double()
    return (flat ** 2).sum(0).cpu(), flat.shape[0]


def _channels_last(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The output gradient as ``[rows, N]``: conv channels are dim 1, everything else is last."""
    if isinstance(module, nn.Conv2d):
        grad = grad.movedim(1, -1)
    return grad.reshape(-1, grad.shape[-1])


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter gradients (the forward then keeps nothing for them), flags restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def output_fisher(ctx: ProfilingContext, units: list[Unit], generator: torch.Generator) -> list[torch.Tensor]:
    """Per unit, ``G``: the mean over output rows of the squared sampled-label score, per channel.

    Only the units' outputs are differentiated, with no parameter gradients: a unit whose
    output depends on nothing differentiable yet (the first projections of the first layer)
    makes its output a leaf, and everything downstream then tracks it. No gradient path is
    cut, because such an output has no tracked unit upstream of it.
    """
    modules = [ctx.modules[u.name] for u in units]
    sums = [torch.zeros(u.shape[0], dtype=torch.float64) for u in units]
    rows = [0] * len(units)
    outputs: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_()
            outputs[index] = output
            return output
        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(modules)]
    batches = fisher_batches(ctx)
    try:
        with frozen(ctx.module):
            for b, batch in enumerate(batches):
                log_probs = log_probs_of(ctx.module, batch.to(modules[0].weight.device), ctx.calibration.tokens)
                score = sampled_score(log_probs, generator)
                order = sorted(outputs)
                grads = torch.autograd.grad(score, [outputs[i] for i in order], allow_unused=True)
                for i, grad in zip(order, grads):
                    if grad is None:  # an output the log-likelihood does not depend on: no sensitivity
                        continue
                    squares, count = channel_squares(modules[i], grad)
                    sums[i] += squares
                    rows[i] += count
                outputs.clear()
                ctx.progress(b + 1, len(batches), "output fisher")
    finally:
        for handle in handles:
            handle.remove()
    return [(s / max(r, 1)).float() for s, r in zip(sums, rows)]


def fisher_mse(ctx: ProfilingContext) -> np.ndarray:
    return fisher_cells(ctx, output_fisher(ctx, ctx.weight_units, fisher_generator(ctx)))


def fisher_generator(ctx: ProfilingContext) -> torch.Generator:
    """The generator the sampled labels are drawn from (option ``fisher_seed``): the same labels
    for the same model and windows, held whole or streamed."""
    return torch.Generator().manual_seed(int(ctx.options.get("fisher_seed", 0)))


def fisher_batches(ctx: ProfilingContext) -> list[torch.Tensor]:
    """The calibration batches the output Fisher is taken on (option ``fisher_batch_size``, default 2)."""
    return ctx.calibration.batches(ctx.options.get("fisher_batch_size", 2))


def fisher_cells(ctx: ProfilingContext, fisher: list[torch.Tensor]) -> np.ndarray:
    """The cells of ``ctx``'s weight units from their output Fisher ``G`` and input Hessians."""
    units = ctx.weight_units
    hessians = ctx.hessians
    samples = ctx.calibration.samples
    errors = np.zeros((len(units), len(ctx.formats)))
    for i, unit in enumerate(units):
        w = ctx.weight(unit)
        g = fisher[i].to(w.device)
        hessian = hessians[unit.name].to(w.device, torch.float32)
        for j, fmt in enumerate(ctx.formats):
            dw = ctx.quantized(unit, fmt) - w
            per_channel = ((dw @ hessian) * dw).sum(1)
            errors[i, j] = 0.5 * float((g * per_channel).sum(dtype=torch.float64)) / samples
        ctx.progress(i + 1, len(units), "fisher_mse")
    return errors
