"""Pareto utilities on objective points (rows), all minimised.

Thin wrappers over pymoo so the rest of the package speaks numpy arrays and
keeps one convention: identical points count once.
"""

from __future__ import annotations

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import find_non_dominated


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Indices of the rows no other row dominates, one per distinct point.

    Works for any number of objectives (2 and 3 are what fronts use).
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return np.empty(0, dtype=np.int64)
    _, first = np.unique(points, axis=0, return_index=True)
    first = np.sort(first)
    return first[np.asarray(find_non_dominated(points[first]), dtype=np.int64)]


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by ``points`` and bounded by ``reference``.

    Points not strictly better than the reference in every objective add
    nothing (pymoo's convention).
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return 0.0
    return float(HV(ref_point=np.asarray(reference, dtype=np.float64))(points))
