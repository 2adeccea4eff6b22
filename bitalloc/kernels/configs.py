"""Autotuning that stays usable under the Triton interpreter.

On a GPU every candidate config is timed once per tuning key. Under
``TRITON_INTERPRET=1`` timings mean nothing and each candidate would run the
whole kernel in Python, so the kernels get a single small config instead.
"""

from __future__ import annotations

import os

import triton
import triton.testing

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""Read once, like ``triton.jit``, which picks compiled or interpreted at decoration time."""


def candidates(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The configs to autotune over in this process."""
    return [interpreter] if INTERPRET else gpu


def quick_bench(kernel_call, quantiles):
    """Time one candidate briefly: the tuning cost is paid on the first call of each shape."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)
