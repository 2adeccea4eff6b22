"""``nn.Module`` faces of the quantized formats, for artifacts and for running models.

Everything a layer needs is a registered buffer, so ``state_dict`` and
safetensors carry it; the format (bits, group size, symmetry) is given to the
constructor, which allocates buffers of the right shapes to load into.
``forward`` runs the Triton kernels on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from bitalloc.kernels import reference
from bitalloc.kernels.dispatch import quant_matmul
from bitalloc.kernels.packing import plane_widths, plane_words
from bitalloc.kernels.weights import Fp8Weight, PackedWeight


class _StorageModule(nn.Module):
    """Moves between devices with its model but ignores dtype casts such as ``model.half()``.

    The buffer dtypes are the format: a cast of fp16 scales to bf16 would lose
    bits, and fp8 weights are floating point, so ``half()`` would widen them.
    """

    def _apply(self, fn, recurse=True):
        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

        return super()._apply(keep_dtype, recurse)


class QuantLinear(_StorageModule):
    """A linear layer with an integer weight packed in bit planes (see :mod:`kernels.packing`).

    Buffers: ``qweight`` (low plane) and, for 3/5/6 bits, ``qweight_hi`` (high
    plane), int32 [N, words]; ``scales`` and, when asymmetric, ``offsets``,
    float16 [N, G]; ``bias`` float32 [N] when present (float32 holds an fp16,
    bf16 or fp32 bias exactly).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None = None,
        symmetric: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        widths = plane_widths(bits)
        group_size = in_features if group_size is None else group_size
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features, out_features: must be positive, got {in_features}, {out_features}")
        if group_size < 1:
            raise ValueError(f"group_size: must be positive, got {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        groups = -(-in_features // group_size)

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.register_buffer("qweight", zeros(out_features, plane_words(in_features, widths[0]), dtype=torch.int32))
        if len(widths) == 2:
            self.register_buffer("qweight_hi", zeros(out_features, plane_words(in_features, widths[1]), dtype=torch.int32))
        self.register_buffer("scales", zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("offsets", None if symmetric else zeros(out_features, groups, dtype=torch.float16))
        self.register_buffer("bias", zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int | None = None,
    ) -> QuantLinear:
        """Build a layer from codes [N, K], scales/offsets [N, G] (no offsets: symmetric) and a bias [N]."""
        return cls.from_weight(
            PackedWeight.from_codes(codes, scales, offsets, bits=bits, group_size=group_size), bias
        )

    @classmethod
    def from_weight(cls, weight: PackedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """Build a layer around an already packed weight."""
        layer = cls(
            weight.in_features, weight.out_features, bits=weight.bits, group_size=weight.group_size,
            symmetric=weight.symmetric, bias=bias is not None, device=weight.device,
        )
        layer.qweight.copy_(weight.planes[0])
        if len(weight.planes) == 2:
            layer.qweight_hi.copy_(weight.planes[1])
        layer.scales.copy_(weight.scales)
        if weight.offsets is not None:
            layer.offsets.copy_(weight.offsets)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def packed_weight(self) -> PackedWeight:
        """A view of the buffers as the weight the kernels read (checked, so a bad load fails here)."""
        planes = (self.qweight, self.qweight_hi) if len(plane_widths(self.bits)) == 2 else (self.qweight,)
        return PackedWeight(planes, self.scales, self.offsets, self.bits, self.group_size, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K]."""
        return reference.dequantize(self.packed_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.packed_weight()
        if x.is_cuda:
            return quant_matmul(x, weight, self.bias)
        return reference.matmul(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )


class Fp8Linear(_StorageModule):
    """A linear layer with a float8 e4m3 weight and one fp16 scale per output row.

    Buffers: ``weight`` float8_e4m3fn [N, K], ``scales`` float16 [N], ``bias``
    float32 [N] when present. The Triton kernels need fp8 conversions in
    hardware (compute capability 8.9+); other devices run the reference.
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool = False, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features, out_features: must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)

    @classmethod
    def from_weight(cls, weight: Fp8Weight, bias: torch.Tensor | None = None) -> Fp8Linear:
        """Build a layer from fp8 values [N, K] with their row scales, and a bias [N]."""
        layer = cls(weight.in_features, weight.out_features, bias=bias is not None, device=weight.device)
        layer.weight.copy_(weight.values)
        layer.scales.copy_(weight.scales)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def fp8_weight(self) -> Fp8Weight:
        """A view of the buffers as the weight the kernels read."""
        return Fp8Weight(self.weight, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K]."""
        return reference.dequantize(self.fp8_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fp8_weight()
        if x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9):
            return quant_matmul(x, weight, self.bias)
        return reference.matmul(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
