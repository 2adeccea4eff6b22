"""The quantized weight formats that the kernels and their reference read.

A weight W has shape [N, K]: N outputs, K inputs, as in ``nn.Linear``.
``PackedWeight`` is an integer format in the storage convention of
:mod:`kernels.packing`; ``Fp8Weight`` is float8 e4m3 with one scale per row.
Both only check and hold tensors: building them from a float weight (choosing
codes and scales) is the quantizers' job in ``quant/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitalloc.kernels.packing import pack, plane_widths, plane_words


@dataclass(frozen=True)
class PackedWeight:
    """Integer codes in bit planes, with fp16 scales and optional fp16 offsets per group.

    Dequantisation is ``w[n, k] = q[n, k] * s[n, k // g] + m[n, k // g]`` in fp32.
    A symmetric weight stores no offsets: its zero point is ``z = 2**(bits - 1)``
    and ``m = -z * s``, exact because z is a power of two.
    """

    planes: tuple[torch.Tensor, ...]
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int

    def __post_init__(self) -> None:
        widths = plane_widths(self.bits)
        if self.in_features < 1:
            raise ValueError(f"in_features: must be positive, got {self.in_features}")
        if self.group_size < 1:
            raise ValueError(f"group_size: must be positive, got {self.group_size}")
        if len(self.planes) != len(widths):
            raise ValueError(f"planes: bits={self.bits} is stored in {len(widths)} plane(s), got {len(self.planes)}")
        n = self.scales.shape[0] if self.scales.dim() == 2 else -1
        for index, (plane, width) in enumerate(zip(self.planes, widths)):
            expected = (n, plane_words(self.in_features, width))
            if plane.dtype != torch.int32 or tuple(plane.shape) != expected:
                raise ValueError(
                    f"planes[{index}]: expected int32 {expected} for a {width}-bit plane, "
                    f"got {plane.dtype} {tuple(plane.shape)}"
                )
        expected = (n, self.num_groups)
        for name, tensor in (("scales", self.scales), ("offsets", self.offsets)):
            if tensor is not None and (tensor.dtype != torch.float16 or tuple(tensor.shape) != expected):
                raise ValueError(f"{name}: expected float16 {expected}, got {tensor.dtype} {tuple(tensor.shape)}")
        devices = {t.device for t in (*self.planes, self.scales, self.offsets) if t is not None}
        if len(devices) != 1:
            raise ValueError(f"planes, scales and offsets must share one device, got {sorted(map(str, devices))}")

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int | None = None,
    ) -> PackedWeight:
        """Pack codes [N, K]; scales/offsets [N, G] are stored as float16.

        ``group_size=None`` means per-channel (one group of K). Quantizers should
        round scales to float16 before choosing codes, since that is what is kept.
        """
        k = codes.shape[-1]
        return cls(
            planes=pack(codes, bits),
            scales=scales.to(torch.float16).contiguous(),
            offsets=None if offsets is None else offsets.to(torch.float16).contiguous(),
            bits=bits,
            group_size=k if group_size is None else group_size,
            in_features=k,
        )

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def symmetric(self) -> bool:
        return self.offsets is None

    @property
    def zero_point(self) -> int:
        """The code that dequantises to zero in a symmetric format (0 when asymmetric)."""
        return 1 << (self.bits - 1) if self.symmetric else 0

    @property
    def device(self) -> torch.device:
        return self.scales.device


@dataclass(frozen=True)
class Fp8Weight:
    """float8 e4m3 values [N, K] with one fp16 scale per output row: ``w = float(v) * s[n]``."""

    values: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        if self.values.dtype != torch.float8_e4m3fn or self.values.dim() != 2:
            raise ValueError(
                f"values: expected a 2-D torch.float8_e4m3fn tensor, got {self.values.dtype} {tuple(self.values.shape)}"
            )
        expected = (self.values.shape[0],)
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != expected:
            raise ValueError(f"scales: expected float16 {expected}, got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.values.device != self.scales.device:
            raise ValueError(f"values and scales must share one device, got {self.values.device} and {self.scales.device}")

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def in_features(self) -> int:
        return self.values.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device
