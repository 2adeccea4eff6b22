"""Budgets: the limits an allocation must respect, in the units users think in."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Literal

Metric = Literal["error", "bytes", "latency"]
METRICS: tuple[Metric, ...] = ("error", "bytes", "latency")


@dataclass(frozen=True)
class Budgets:
    """Any combination of limits; ``None`` means unlimited.

    ``max_bytes`` and ``max_avg_bits`` both limit size, so they fold into one
    byte cap (see :meth:`byte_cap`); ``max_error`` limits the predicted error
    and is the budget of the accuracy-target direction (minimise bytes).
    """

    max_bytes: int | None = None
    max_avg_bits: float | None = None
    max_latency: float | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{field.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{field.name} must be finite and >= 0, got {value!r}")
            if field.name == "max_bytes" and not float(value).is_integer():
                raise ValueError(f"max_bytes must be a whole number of bytes, got {value!r}")
            object.__setattr__(self, field.name, int(value) if field.name == "max_bytes" else float(value))

    def byte_cap(self, total_numel: int) -> int | None:
        """The largest byte total that meets both size budgets, or None.

        Average bits are ``8 * bytes / total_numel`` as Python computes it
        (correctly rounded), so the cap is the largest integer whose average
        does not exceed ``max_avg_bits`` in that same arithmetic: a budget equal
        to a reported average is always met.
        """
        caps = [] if self.max_bytes is None else [int(self.max_bytes)]
        if self.max_avg_bits is not None:
            caps.append(largest_bytes_within(self.max_avg_bits, total_numel))
        return min(caps) if caps else None

    def caps(self, total_numel: int) -> dict[Metric, float]:
        """The limit on each metric (bytes as an int), only for those limited."""
        caps: dict[Metric, float] = {}
        byte_cap = self.byte_cap(total_numel)
        if byte_cap is not None:
            caps["bytes"] = byte_cap
        if self.max_latency is not None:
            caps["latency"] = float(self.max_latency)
        if self.max_error is not None:
            caps["error"] = float(self.max_error)
        return caps

    def objective(self) -> Metric:
        """What a solve within these budgets minimises: bytes when only the error is bounded (the
        smallest allocation within an error budget), else the predicted error."""
        return "bytes" if set(self.given()) == {"max_error"} else "error"

    def given(self) -> dict[str, float]:
        """The budgets that are set, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def describe(self) -> str:
        """``max_bytes=..., max_latency=...`` for the budgets that are set."""
        return ", ".join(f"{name}={value:.6g}" for name, value in self.given().items())


def average_bits(total_bytes: int, total_numel: int) -> float:
    """Average bits per element, the one definition every module uses."""
    return 8 * total_bytes / total_numel


def largest_bytes_within(max_avg_bits: float, total_numel: int) -> int:
    """The largest byte total whose :func:`average_bits` is <= ``max_avg_bits``."""
    cap = math.floor(Fraction(max_avg_bits) * total_numel / 8)
    while average_bits(cap + 1, total_numel) <= max_avg_bits:
        cap += 1
    while cap >= 0 and average_bits(cap, total_numel) > max_avg_bits:
        cap -= 1
    return cap
