"""Bit-plane packing of integer codes into int32 words along K.

A ``bits``-wide code is split into at most two planes whose widths divide 32
(``PLANES``), so a kernel unpacks every plane with the same shift-and-mask and
no branches: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2. The low bits of a code go in the
first plane, the high bits in the second. A plane of width ``p`` packs
``32 // p`` consecutive codes per word, code ``j`` of a word in bits
``[j * p, (j + 1) * p)``, and takes ``ceil(K * p / 32)`` words per row; the
tail of the last word is zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PLANES: dict[int, tuple[int, ...]] = {
    2: (2,),
    3: (2, 1),
    4: (4,),
    5: (4, 1),
    6: (4, 2),
    8: (8,),
}
"""Plane widths for each supported code width, low plane first."""


def plane_widths(bits: int) -> tuple[int, ...]:
    """The plane widths that store ``bits``-wide codes (raises for other widths)."""
    try:
        return PLANES[bits]
    except KeyError:
        raise ValueError(f"bits={bits}: supported code widths are {sorted(PLANES)}") from None


def plane_words(k: int, width: int) -> int:
    """Words per row of a ``width``-bit plane holding ``k`` codes."""
    return -(-k * width // 32)


def packed_nbytes(n: int, k: int, bits: int) -> int:
    """Exact bytes of the packed codes of an [n, k] weight (scales not included)."""
    return 4 * n * sum(plane_words(k, width) for width in plane_widths(bits))


def pack(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Pack integer codes [N, K] in ``[0, 2**bits - 1]`` into int32 planes [N, words]."""
    widths = plane_widths(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D [N, K] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer tensor, got {codes.dtype}")
    values = codes.to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(
            f"codes: values must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
            f"got [{int(values.min())}, {int(values.max())}]"
        )
    planes = []
    shift = 0
    for width in widths:
        planes.append(_pack_plane((values >> shift) & ((1 << width) - 1), width))
        shift += width
    return tuple(planes)


def unpack(planes: Sequence[torch.Tensor], k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes [N, k]."""
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"planes: bits={bits} is stored in {len(widths)} plane(s), got {len(planes)}")
    codes = torch.zeros((planes[0].shape[0], k), dtype=torch.int32, device=planes[0].device)
    shift = 0
    for plane, width in zip(planes, widths):
        codes |= _unpack_plane(plane, k, width) << shift
        shift += width
    return codes.to(torch.uint8)


def _pack_plane(fields: torch.Tensor, width: int) -> torch.Tensor:
    per_word = 32 // width
    n, k = fields.shape
    words = plane_words(k, width)
    padded = torch.nn.functional.pad(fields, (0, words * per_word - k))
    shifts = torch.arange(per_word, device=fields.device, dtype=torch.int64) * width
    # The fields occupy disjoint bits, so their sum is their bitwise or.
    packed = (padded.view(n, words, per_word) << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32)


def _unpack_plane(plane: torch.Tensor, k: int, width: int) -> torch.Tensor:
    per_word = 32 // width
    n = plane.shape[0]
    expected = plane_words(k, width)
    if plane.dtype != torch.int32 or plane.dim() != 2 or plane.shape[1] != expected:
        raise ValueError(
            f"planes: a {width}-bit plane of {k} codes must be int32 [N, {expected}], "
            f"got {plane.dtype} {tuple(plane.shape)}"
        )
    shifts = torch.arange(per_word, device=plane.device, dtype=torch.int32) * width
    # Arithmetic shift of a negative word fills with ones; the mask drops them.
    fields = (plane.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return fields.reshape(n, expected * per_word)[:, :k]
