"""Sensitivity metrics: how much each unit suffers in each format.

Each metric fills the weight rows of the profile's error table; all are selectable by
name through ``METRICS``. They share one ``ProfilingContext`` so that what several cells
need (input Hessians, gradients, reference logits) is computed once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.fisher import fisher
from bitalloc.quant.metrics.fisher_mse import fisher_mse
from bitalloc.quant.metrics.hessian_trace import hessian_trace
from bitalloc.quant.metrics.kl import kl
from bitalloc.quant.metrics.output_mse import output_mse

MetricFn = Callable[[ProfilingContext], np.ndarray]

METRICS: dict[str, MetricFn] = {
    "output_mse": output_mse,
    "hessian_trace": hessian_trace,
    "fisher": fisher,
    "fisher_mse": fisher_mse,
    "kl": kl,
}


def get_metric(name: str) -> MetricFn:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]
