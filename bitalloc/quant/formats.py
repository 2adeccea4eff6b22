"""Candidate number formats: what each costs in bytes and how it quantizes a tensor.

A format turns a weight matrix ``W`` of shape ``[N, K]`` (``N`` outputs, ``K`` inputs;
see ``quant.units.weight_matrix`` for how any Linear/Conv weight gets that view) into
integer codes plus per-group scales (and, for asymmetric formats, per-group offsets),
and back. The storage layout is the one ``kernels`` runs on:

* codes are packed along ``K`` into 32-bit words, odd widths as bit planes
  (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2), so a plane of width ``p`` takes
  ``ceil(K * p / 32)`` words per row;
* scales are float16, one per group of ``group_size`` inputs (the last group may be
  partial); asymmetric formats add a float16 offset per group;
* dequantization is one fused multiply-add: ``w = q * s + m``. Symmetric integer
  formats store no offset: their zero point is ``2**(bits-1)`` and ``m = -z * s``.

``Format.nbytes(shape)`` is therefore the exact size of the packed artifact's tensors,
which is what the search budgets count.

Names: ``int{2,3,4,5,6,8}_g{32,64,128}`` or ``..._pc`` (per output channel) with an
optional ``_asym`` suffix; ``nf4_g{64,...}``; ``fp8_e4m3``, ``fp6_e3m2`` (per channel,
``_g{G}`` to group them); ``fp4_e2m1`` (groups of 32 by default); ``bf16`` and ``fp16``
(kept as 16-bit); and llama.cpp's own types by their ggml names in lower case (``q4_k``,
``q8_0``, ``iq4_xs``: ``bitalloc.ggml.FORMATS``), which ``GgmlFormat`` simulates with ggml's
own quantizer and which no bitalloc kernel runs. ``get_format`` parses any such name, not only
the listed ones.
"""

from __future__ import annotations

import functools
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from bitalloc import ggml
from bitalloc.kernels.packing import packed_nbytes

INT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
SCALE_BYTES = 2  # float16 scales and offsets

# NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and per-group parameters of one quantized ``[N, K]`` matrix.

    ``codes`` is uint8 ``[N, K]``; ``scales`` (and ``offsets`` when the format has
    them) are float16 ``[N, G]``. ``dequantize()`` is the exact value a kernel computes.
    """

    format: "Format"
    codes: torch.Tensor
    scales: torch.Tensor | None
    offsets: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self)


def _group_count(k: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(k / group_size)


def _expand_groups(params: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """Repeat per-group parameters ``[N, G]`` to per-element ``[N, K]``."""
    size = k if group_size is None else group_size
    return params.float().repeat_interleave(size, dim=1)[:, :k]


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """View ``[N, K]`` as ``[N, G, g]``, padding a partial last group with its own values.

    Padding repeats the row's last element so the padded slots never widen a
    group's min/max: the statistics of a partial group are those of its real members.
    """
    n, k = w.shape
    g = k if group_size is None else group_size
    groups = math.ceil(k / g)
    pad = groups * g - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, groups, g), k


class Format(ABC):
    """A candidate number format for one unit."""

    name: str
    bits: int
    group_size: int | None

    @property
    def is_keep(self) -> bool:
        return False

    @property
    def has_codes(self) -> bool:
        """Whether ``quantize`` gives bitalloc's codes and scales; a format without them is only simulated."""
        return not self.is_keep

    @abstractmethod
    def nbytes(self, shape: tuple[int, int]) -> int:
        """Exact bytes to store a ``[N, K]`` matrix in this format, scales included."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        """Round-to-nearest quantization of a ``[N, K]`` matrix."""

    @abstractmethod
    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """The float32 matrix the codes stand for."""

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize for simulation, in ``w``'s dtype; equal to what the artifact holds."""
        return self.quantize(w).dequantize().to(w.dtype)

    def __repr__(self) -> str:
        return f"Format({self.name!r})"


@dataclass(frozen=True, repr=False)
class IntFormat(Format):
    """Uniform integer grid with float16 scales per group (and offsets when asymmetric).

    Symmetric follows GPTQ: ``s = 2 * absmax / (2**b - 1)``, zero point ``2**(b-1)``, so all
    ``2**b`` codes are used and ``+absmax`` lands half a step from the top code. Asymmetric
    stores the group minimum as a float16 offset (as llama.cpp's ``Q4_1`` does), so a
    weight that already lies on such a grid is reproduced exactly.
    """

    bits: int
    group_size: int | None
    symmetric: bool = True

    @property
    def name(self) -> str:  # type: ignore[override]
        group = "pc" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}_{group}" + ("" if self.symmetric else "_asym")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def nbytes(self, shape: tuple[int, int]) -> int:
        n, k = shape
        per_group = SCALE_BYTES * (1 if self.symmetric else 2)
        return packed_nbytes(n, k, self.bits) + n * _group_count(k, self.group_size) * per_group

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group float16 scales (and offsets) for ``w`` ``[N, K]``, as stored."""
        grouped, _ = _grouped(w.float(), self.group_size)
        if self.symmetric:
            absmax = grouped.abs().amax(dim=-1)
            scales = (2 * absmax / self.max_code).half()
            return torch.where(scales > 0, scales, torch.ones_like(scales)), None
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
        scales = ((high - low) / self.max_code).half()
        return torch.where(scales > 0, scales, torch.ones_like(scales)), low.half()

    def offsets_for(self, scales: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """The stored offset ``m`` of ``w = q * s + m``; derived as ``-z * s`` when symmetric."""
        if offsets is not None:
            return offsets
        return (-self.zero_point * scales.float()).half()

    def codes_for(self, w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """Nearest codes of ``w`` (any number of columns) on the grid given by ``scales``/``offsets``.

        ``scales`` and ``offsets`` are per element (already expanded), so GPTQ can call this
        one column at a time with the same arithmetic as whole-matrix RTN.
        """
        m = self.offsets_for(scales, offsets).float()
        q = torch.round((w.float() - m) / scales.float())
        return q.clamp_(0, self.max_code).to(torch.uint8)

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        k = w.shape[1]
        scales, offsets = self.grid(w)
        s = _expand_groups(scales, k, self.group_size)
        m = None if offsets is None else _expand_groups(offsets, k, self.group_size)
        return QuantizedTensor(self, self.codes_for(w, s, m), scales, offsets)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        k = q.codes.shape[1]
        s = _expand_groups(q.scales, k, self.group_size)
        m = _expand_groups(self.offsets_for(q.scales, q.offsets), k, self.group_size)
        return q.codes.float() * s + m


@dataclass(frozen=True, repr=False)
class LookupFormat(Format):
    """A 16-entry (or 2**bits-entry) codebook scaled by a float16 absmax per group.

    Covers NF4 and the small floats (FP8 e4m3, FP6 e3m2, FP4 e2m1): their codes are the
    real bit patterns, ``levels[code]`` is the value they encode.
    """

    label: str
    bits: int
    group_size: int | None
    levels: tuple[float, ...]

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    @functools.cached_property
    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All levels by code, and the finite codes sorted by their value (for nearest search)."""
        levels = torch.tensor(self.levels, dtype=torch.float32)
        finite = torch.nonzero(~torch.isnan(levels)).flatten()
        order = finite[torch.argsort(levels[finite], stable=True)]
        return levels, order

    @property
    def max_level(self) -> float:
        return max(abs(v) for v in self.levels if not math.isnan(v))

    def nbytes(self, shape: tuple[int, int]) -> int:
        n, k = shape
        return packed_nbytes(n, k, self.bits) + n * _group_count(k, self.group_size) * SCALE_BYTES

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        levels, order = self._table
        grouped, k = _grouped(w.float(), self.group_size)
        scales = (grouped.abs().amax(dim=-1) / self.max_level).half()
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        x = w.float() / _expand_groups(scales, k, self.group_size)
        ordered = levels[order]
        upper = torch.searchsorted(ordered, x.contiguous()).clamp_(1, len(ordered) - 1)
        lower = upper - 1
        nearer_lower = (x - ordered[lower]) <= (ordered[upper] - x)
        index = torch.where(nearer_lower, lower, upper)
        return QuantizedTensor(self, order[index].to(torch.uint8), scales, None)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        levels, _ = self._table
        k = q.codes.shape[1]
        return levels[q.codes.long()] * _expand_groups(q.scales, k, self.group_size)


@dataclass(frozen=True, repr=False)
class KeepFormat(Format):
    """The unit stays in 16-bit (bf16 or fp16): no codes, no scales."""

    label: str
    dtype: torch.dtype
    bits: int = 16
    group_size: int | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    @property
    def is_keep(self) -> bool:
        return True

    def nbytes(self, shape: tuple[int, int]) -> int:
        n, k = shape
        return n * k * 2

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        raise TypeError(f"{self.name} keeps the tensor in 16-bit; use fake_quantize")

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        raise TypeError(f"{self.name} keeps the tensor in 16-bit; use fake_quantize")

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(self.dtype).to(w.dtype)


@dataclass(frozen=True, repr=False)
class GgmlFormat(Format):
    """One of llama.cpp's tensor types (``q4_k``, ``q8_0``, ``iq4_xs``), quantized by ggml itself.

    The bytes and the error are those of the tensor llama-quantize writes from the 16-bit GGUF
    that ``convert_hf_to_gguf.py --outtype f16`` makes: the weight rounded to float16, quantized
    by ggml's ``ggml_quantize_chunk`` (ctypes on the library that ``bitalloc llamacpp build``
    builds) and read back by ``gguf``'s dequantizer. GGUF stores a ``[N, K]`` weight as ``N``
    rows of ``K``; where the type's block does not divide ``K``, llama.cpp writes its fallback
    type (``ggml_type_for``), and so do the bytes and the simulation here.

    No bitalloc kernel runs these blocks, so ``quantize`` refuses: the search simulates them
    (``fake_quantize``), and llama-quantize builds the model (a GGUF, not bitalloc's artifact).
    ``importance`` is llama.cpp's importance matrix (``--imatrix``): bitalloc's calibration-aware
    method ``gptq`` means, for these types, llama.cpp's own calibration-aware rounding, weighted by
    the mean squared activation of each input column of the calibration Hessians GPTQ uses
    (``quantizers.importance_matrix``; ``rtn`` passes none).
    """

    label: str

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    @property
    def ggml_type(self) -> str:
        """The ggml type asked for (``Q4_K``); rows it does not fit get ``ggml_type_for``'s."""
        return self.label.upper()

    @property
    def bits(self) -> int:  # type: ignore[override]
        """The code width (``q4_k``, ``iq4_xs``, ``mxfp4`` -> 4); bytes come from the blocks."""
        return int(re.search(r"\d", self.label)[0])

    @property
    def group_size(self) -> int:  # type: ignore[override]
        """Weights per block: 256 for k-quants, IQ4_XS and IQ3_S, 32 for the others."""
        return ggml.block(self.ggml_type)[0]

    @property
    def has_codes(self) -> bool:
        return False

    def ggml_type_for(self, shape: tuple[int, int]) -> str:
        """The type llama-quantize writes for a ``[N, K]`` weight: this one, its fallback, or F16."""
        return ggml.stored_type(self.ggml_type, shape[1])

    def nbytes(self, shape: tuple[int, int]) -> int:
        n, k = shape
        weights, size = ggml.block(self.ggml_type_for(shape))
        return n * (k // weights) * size

    def quantize(self, w: torch.Tensor) -> QuantizedTensor:
        raise TypeError(f"{self.name} is llama.cpp's type: bitalloc's kernels have no layout for it; "
                        f"use fake_quantize, or build a GGUF with llama-quantize")

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        raise TypeError(f"{self.name} is llama.cpp's type: its blocks are decoded by decode()")

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
        """The blocks llama-quantize writes for ``w`` ``[N, K]``: uint8 ``[N, row bytes]``
        (float16 values when the row fits no quantized type)."""
        from bitalloc.quant.llamacpp.ggml_lib import quantize_rows

        rows = w.detach().to(torch.float16)
        stored = self.ggml_type_for(tuple(w.shape))
        if stored == "F16":
            return rows.cpu().numpy().view(np.uint8)
        imatrix = None if importance is None else importance.detach().float().cpu().numpy()
        return quantize_rows(stored, rows.float().cpu().numpy(), imatrix)

    def decode(self, blocks: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
        """The float32 ``[N, K]`` matrix that ``encode``'s blocks stand for."""
        from bitalloc.quant.llamacpp.ggml_lib import dequantize_rows

        return torch.from_numpy(dequantize_rows(self.ggml_type_for(shape), blocks)).reshape(shape)

    def fake_quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(w, importance), tuple(w.shape)).to(device=w.device, dtype=w.dtype)


def minifloat_levels(exponent_bits: int, mantissa_bits: int, *, nan_top: bool) -> tuple[float, ...]:
    """Every value of a sign/exponent/mantissa float with no infinities, indexed by bit pattern.

    ``nan_top`` reserves the all-ones patterns as NaN (FP8 e4m3fn); they stay NaN here and
    ``LookupFormat`` never picks them.
    """
    bias = (1 << (exponent_bits - 1)) - 1
    values = []
    for code in range(1 << (1 + exponent_bits + mantissa_bits)):
        sign = -1.0 if code >> (exponent_bits + mantissa_bits) else 1.0
        exponent = (code >> mantissa_bits) & ((1 << exponent_bits) - 1)
        mantissa = code & ((1 << mantissa_bits) - 1)
        if exponent == 0:
            magnitude = mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
        else:
            magnitude = (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
        values.append(sign * magnitude)
    if nan_top:
        top = (1 << (exponent_bits + mantissa_bits)) - 1
        for code in (top, top | (1 << (exponent_bits + mantissa_bits))):
            values[code] = math.nan
    return tuple(values)


_MINIFLOATS = {
    "fp8_e4m3": (4, 3, True, None),
    "fp6_e3m2": (3, 2, False, None),
    "fp4_e2m1": (2, 1, False, 32),
}

_NAME = re.compile(
    r"^(?:int(?P<bits>\d+)_(?:g(?P<group>\d+)|(?P<pc>pc))(?P<asym>_asym)?"
    r"|(?P<nf4>nf4)(?:_g(?P<nf4_group>\d+))?"
    r"|(?P<fp>fp8_e4m3|fp6_e3m2|fp4_e2m1)(?:_g(?P<fp_group>\d+)|_(?P<fp_pc>pc))?"
    r"|(?P<keep>bf16|fp16)"
    r"|(?P<ggml>" + "|".join(t.lower() for t in ggml.FORMATS) + "))$"
)


def _checked_group(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    group = int(text)
    if group < 8 or group & (group - 1):
        raise ValueError(f"format {name!r}: group size must be a power of two >= 8, got {group}")
    return group


@functools.lru_cache(maxsize=None)
def get_format(name: str) -> Format:
    """The format a name stands for; a ``ValueError`` lists the accepted spellings otherwise."""
    match = _NAME.match(name.strip().lower())
    if not match:
        raise ValueError(
            f"unknown format {name!r}: expected int{{2,3,4,5,6,8}}_g{{G}}|_pc[_asym], nf4[_g{{G}}], "
            f"fp8_e4m3, fp6_e3m2, fp4_e2m1 [_g{{G}}|_pc], bf16, fp16, or a llama.cpp type: "
            f"{', '.join(t.lower() for t in ggml.FORMATS)}"
        )
    if match["bits"]:
        bits = int(match["bits"])
        if bits not in INT_BITS:
            raise ValueError(f"format {name!r}: integer widths are {INT_BITS}, got {bits}")
        return IntFormat(bits, _checked_group(match["group"], name), symmetric=not match["asym"])
    if match["nf4"]:
        group = _checked_group(match["nf4_group"], name) or 64
        return LookupFormat(f"nf4_g{group}", 4, group, NF4_LEVELS)
    if match["fp"]:
        exponent, mantissa, nan_top, default_group = _MINIFLOATS[match["fp"]]
        group = None if match["fp_pc"] else (_checked_group(match["fp_group"], name) or default_group)
        label = match["fp"] if group == default_group else f"{match['fp']}_{'pc' if group is None else f'g{group}'}"
        levels = minifloat_levels(exponent, mantissa, nan_top=nan_top)
        return LookupFormat(label, 1 + exponent + mantissa, group, levels)
    if match["ggml"]:
        return GgmlFormat(match["ggml"])
    return KeepFormat(match["keep"], torch.bfloat16 if match["keep"] == "bf16" else torch.float16)


def standard_formats() -> list[Format]:
    """The registry's listed formats: every integer width x group x symmetry, NF4, the floats, 16-bit."""
    formats: list[Format] = []
    for bits in INT_BITS:
        for group in (*GROUP_SIZES, None):
            for symmetric in (True, False):
                formats.append(IntFormat(bits, group, symmetric))
    formats += [get_format(n) for n in ("nf4_g64", "nf4_g128", "fp8_e4m3", "fp6_e3m2", "fp4_e2m1", "bf16", "fp16")]
    return formats


def parse_formats(names: str | list[str]) -> list[Format]:
    """Formats from a comma-separated string or a list, rejecting duplicates by name."""
    items = [n for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    formats = [get_format(n) for n in items]
    seen: set[str] = set()
    for f in formats:
        if f.name in seen:
            raise ValueError(f"format {f.name!r} is listed twice")
        seen.add(f.name)
    if not formats:
        raise ValueError("no formats given")
    return formats
