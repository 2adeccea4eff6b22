"""What a measured objective looks like to the search: one protocol, ``Measure``.

The search ranks allocations by an additive proxy (the profile's error); a measure runs the
real thing (e.g. the KL of the quantized model on calibration text) and returns one value
per window of that text. Each consumer reduces the windows its own way:

- ``refine`` and ``optuna`` take their mean;
- ``descent`` runs a paired test over them (is a step lower on the windows consistently,
  or carried by one?);
- ``smallest_within`` holds a target to the upper confidence bound of their mean.

A measure is a plain callable, so ``pipeline`` can pass one over a model without ``search``
knowing what a model is.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from bitalloc.search.allocation import Allocation


class Measure(Protocol):
    """Measures an allocation on about ``samples`` tokens (or samples): a 1-D array with one
    value per window, lower is better.

    More samples cost more and are more precise, so a search can screen many candidates
    cheaply and measure the survivors carefully. The same (allocation, samples) must give the
    same values, so callers can rely on the comparisons they made.
    """

    def __call__(self, allocation: Allocation, samples: int) -> np.ndarray: ...


def windows(measure: Measure, allocation: Allocation, samples: int) -> np.ndarray:
    """The measurement as a 1-D float array, refusing anything else (a scalar, an empty array)."""
    values = np.asarray(measure(allocation, samples), dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"a measure returns one value per window (a non-empty 1-D array), got shape {values.shape}")
    return values


def p_lower(current: np.ndarray, candidate: np.ndarray, confidence: float | None = 0.95) -> float:
    """How likely a candidate measures this much lower than the current point by chance: a
    one-sided paired t-test over the windows; with no test (one window, identical gains, or
    ``confidence`` None), 0 when its mean is lower and 1 otherwise. Descent and the surrogate
    accept a candidate when this is at most ``1 - confidence``."""
    from scipy.stats import ttest_rel  # SciPy loads with the measured solvers, not with ``bitalloc.search``

    gain = np.asarray(current) - np.asarray(candidate)
    if confidence is None or len(gain) < 2 or np.ptp(gain) == 0.0:
        return 0.0 if gain.mean() > 0 else 1.0
    return float(ttest_rel(current, candidate, alternative="greater").pvalue)


def mean(measure: Measure, allocation: Allocation, samples: int) -> float:
    """The mean over the windows: what refine and optuna compare."""
    return float(windows(measure, allocation, samples).mean())
