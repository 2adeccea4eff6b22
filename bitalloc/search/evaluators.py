"""What a measured objective looks like to the search.

The search ranks allocations by an additive proxy (the profile's error);
evaluators measure the real thing (e.g. the KL of the quantized model on
calibration text). They are plain callables so ``service`` can pass a
closure over a model without ``search`` knowing what a model is.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from bitalloc.search.allocation import Allocation


class Evaluator(Protocol):
    """Measures an allocation; lower is better."""

    def __call__(self, allocation: Allocation) -> float: ...


class SampledEvaluator(Protocol):
    """Measures an allocation on ``samples`` tokens/samples; lower is better.

    More samples cost more and are more precise, so a search can screen many
    candidates cheaply and measure the survivors carefully. Returning the
    same value for the same (allocation, samples) lets callers rely on the
    comparisons they made.
    """

    def __call__(self, allocation: Allocation, samples: int) -> float: ...


class WindowedEvaluator(SampledEvaluator, Protocol):
    """A sampled evaluator that can also give its measurement window by window (e.g. the KL of
    each text window), so a search can ask whether a difference between two allocations is
    consistent across the sample or carried by one window: a paired test instead of a bare
    comparison of means, which is what keeps a search from fitting the noise of few windows.
    """

    def per_window(self, allocation: Allocation, samples: int) -> np.ndarray: ...
