"""GPTQ (Frantar et al., 2022): quantize a layer column by column, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian.

The Hessian of the layer-wise error ``||W X - Q X||^2`` is ``H = X^T X`` (``X`` being the
layer's calibration inputs, one row per token), so GPTQ minimises the same quantity,
``tr(dW H dW^T)``, that the ``output_mse`` metric reports: the profile can use GPTQ's
error for the formats GPTQ applies to.
"""

from __future__ import annotations

import torch

from bitalloc.quant.formats import IntFormat, QuantizedTensor


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)``: the summed squared output error over the calibration tokens."""
    dw = (w_hat.double() - w.double())
    return float(torch.einsum("nk,kl,nl->", dw, hessian.double(), dw))


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> QuantizedTensor:
    """GPTQ-quantize ``w`` ``[N, K]`` with the calibration Hessian ``[K, K]``.

    ``damp`` adds that fraction of the mean diagonal to the diagonal, which keeps the
    Cholesky factorisation stable when inputs are nearly collinear. ``act_order`` visits
    columns by decreasing Hessian diagonal (the most important first); its groups are then
    fixed from the unquantized weights up front ("static groups"), so the stored per-group
    scales stay contiguous along ``K`` as the kernels need. Without it, each group's grid is
    fitted when GPTQ reaches the group, on the weights as updated so far, as in the paper.
    """
    if not isinstance(fmt, IntFormat):
        raise TypeError(f"GPTQ applies to integer formats, not {fmt.name}")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {tuple(w.shape)}, got {tuple(hessian.shape)}")

    weight = w.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0

    group = k if fmt.group_size is None else fmt.group_size
    groups = -(-k // group)
    scales = torch.empty(n, groups, dtype=torch.float16)
    offsets = None if fmt.symmetric else torch.empty(n, groups, dtype=torch.float16)
    static = act_order or fmt.group_size is None
    if static:
        scales, offsets = fmt.grid(weight)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    weight = weight[:, perm]
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.empty(n, k, dtype=torch.uint8)
    # Dynamic groups are fitted on a block's live columns, so blocks must hold whole groups.
    block = block_size if static else max(block_size // group, 1) * group
    for start in range(0, k, block):
        end = min(start + block, k)
        live = weight[:, start:end].clone()
        errors = torch.zeros_like(live)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            column = int(perm[start + i])
            g = column // group
            if not static and column % group == 0:
                s, m = fmt.grid(live[:, i : i + group])
                scales[:, g] = s[:, 0]
                if offsets is not None:
                    offsets[:, g] = m[:, 0]
            s = scales[:, g : g + 1]
            m = None if offsets is None else offsets[:, g : g + 1]
            q = fmt.codes_for(live[:, i : i + 1], s, m)
            codes[:, column] = q[:, 0]
            dequantized = q.float() * s.float() + fmt.offsets_for(s, m).float()
            err = (live[:, i] - dequantized[:, 0]) / hblock[i, i]
            live[:, i:] -= err[:, None] * hblock[i, i:][None, :]
            errors[:, i] = err
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return QuantizedTensor(fmt, codes, scales, offsets)
