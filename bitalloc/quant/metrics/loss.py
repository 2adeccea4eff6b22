"""The loss the curvature metrics (``hessian_trace``, ``fisher``) differentiate, and how they
differentiate it by the unit weights only.

The loss is the next-token cross-entropy, averaged over the predicted tokens of a batch of
calibration windows: the quantity whose increase quantization causes. Gradients are taken
with respect to the units' weight tensors alone, so embeddings and norms cost no gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitalloc.quant.device import module_device
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.units import is_transposed_conv1d


def next_token_loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each window's next token given its prefix."""
    batch = batch.to(module_device(module))
    output = module(batch, use_cache=False)
    logits = output.logits if hasattr(output, "logits") else output
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def unit_weights(ctx: ProfilingContext) -> list[nn.Parameter]:
    """The weight tensor of every weight unit, in ``ctx.weight_units`` order.

    Refuses a profile whose calibration is not token windows: without next tokens there
    is no loss to differentiate.
    """
    if not ctx.calibration.tokens:
        raise ValueError(f"{ctx.model.spec}: gradient metrics need a language model and token windows "
                         "(their loss is the next-token cross-entropy)")
    return [ctx.modules[u.name].weight for u in ctx.weight_units]


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like ``module.weight`` (its gradient, say) in ``weight_matrix``'s ``[N, K]`` view."""
    return tensor.t() if is_transposed_conv1d(module) else tensor.reshape(tensor.shape[0], -1)


@contextlib.contextmanager
def differentiable(weights: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients on, for ``weights`` (whatever their flag was) and through attention twice over.

    Attention runs on PyTorch's math kernel here: the fused CPU/GPU kernels have no
    derivative of their backward pass, which Hessian-vector products need.
    """
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
