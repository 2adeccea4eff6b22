"""Integer views of float metrics, so exact solvers compare sums exactly.

CP-SAT needs integer coefficients and the DP indexes a table by cost, so
error and latency are scaled by a power of two and rounded per unit. The
scale is fine enough that the rounding of a whole allocation's total is at
most ``RELATIVE_TOLERANCE`` of the metric's magnitude (the sum over units of
their largest value); bytes are integers already and stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RELATIVE_TOLERANCE = 1e-9
_MAX_EXPONENT = 1000  # keeps the factor finite; only magnitudes below ~1e-290 lose the 1e-9 promise


@dataclass(frozen=True)
class IntegerScale:
    """``round(value * factor)`` per unit; sums of those are exact integers.

    For any allocation with true total ``T`` and integer total ``R`` (the sum
    of its rounded unit values), ``|R / factor - T| <= units / (2 * factor)``.
    A limit ``L`` becomes :meth:`cap`, the largest ``R`` an allocation with
    ``T <= L`` can have, so no allocation that truly meets ``L`` is excluded,
    and every allocation admitted has ``T <= L + tolerance``.
    """

    factor: float
    units: int

    @classmethod
    def for_values(cls, values: np.ndarray, allowed: np.ndarray) -> IntegerScale:
        """The coarsest power-of-two scale meeting ``RELATIVE_TOLERANCE``."""
        units = values.shape[0]
        magnitude = float(np.abs(np.where(allowed, values, 0.0)).max(axis=1).sum())
        if magnitude == 0.0:
            return cls(factor=1.0, units=units)
        exponent = math.ceil(math.log2(units) - math.log2(RELATIVE_TOLERANCE) - math.log2(magnitude))
        return cls(factor=2.0 ** min(exponent, _MAX_EXPONENT), units=units)

    @property
    def tolerance(self) -> float:
        """How far above a limit an admitted allocation's true total can be."""
        return self.units / self.factor

    def apply(self, values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Per-cell integers (0 where not allowed)."""
        return np.rint(np.where(allowed, values, 0.0) * self.factor).astype(np.int64)

    def cap(self, limit: float) -> int:
        """The largest integer total an allocation meeting ``limit`` can have."""
        return math.floor(min(limit * self.factor + self.units / 2, 2.0**62))
