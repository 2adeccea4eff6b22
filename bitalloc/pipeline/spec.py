"""The job spec: everything one job needs, as the REST API and the CLI hand it to ``run_job``.

A job's limits are one ``search.Budgets`` (predicted size, latency and error) plus, apart
from them, the accuracy target ``measured_kl``: KL measured by running the model, which asks
for the smallest allocation that meets it and so stands alone. ``check_target`` is the one
place that says so; the REST schema and the CLI call it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bitalloc.quant.device import check_device_name
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.loading import model_dtype
from bitalloc.quant.quantizers import Method
from bitalloc.search import Budgets

KL_METRICS = ("fisher_mse", "kl")  # metrics whose cells are KL in nats per token


@dataclass
class JobSpec:
    """Everything a job needs; the REST API and the CLI build one of these."""

    model: str
    formats: list[str]
    metric: str = "fisher_mse"
    solver: str = "dp"
    method: Method = "rtn"
    budgets: Budgets = field(default_factory=Budgets)
    measured_kl: float | None = None  # the accuracy target: KL measured by the model itself, not predicted
    points: int = 32
    calibration: str | None = None
    seq_len: int = 512
    samples: int = 32
    seed: int = 0
    bos: bool | None = None  # windows start with BOS: as the tokenizer starts a sequence (None), always, or never
    kv: KVOptions | None = None
    hardware: str = "h100"  # the GPU the latency budget is for, not where the job computes
    dtype: str = "auto"  # what the model runs in while the job measures it: auto, fp32, bf16 or fp16
    device: str = "auto"  # where the model computes: auto (CUDA when present), cpu, cuda or cuda:N
    max_memory: int | None = None  # bytes the model may take on the device (None: what it has free)
    stream: bool = False  # profile block by block even when the weights would fit in max_memory
    evaluation: str | None = "zoo:evaluation"
    eval_windows: int = 16
    baseline: str | None = None
    refine: int = 0
    descend: int = 0
    surrogate: int = 0  # rounds of the measured interaction surrogate (fit, solve exactly, measure); 0: none
    fitness_windows: int = 8
    gradient_windows: int = 8
    ties: bool = True

    @property
    def fitness_source(self) -> str:
        """The text measured search scores candidates on: the job's own calibration text (at
        other offsets) or, by default, the reference tuning split, which holds both kinds of
        text the reference evaluation does."""
        return self.calibration or "zoo:tuning"

    def __post_init__(self) -> None:
        """What a spec can be refused for by itself, before anything is loaded (a CLI refusing a
        bad argument in a second relies on it)."""
        parse_formats(self.formats)
        model_dtype(self.dtype)
        check_device_name(self.device)
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, got {self.max_memory}")
        for name in ("descend", "surrogate", "refine"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (none) or a positive count, got {getattr(self, name)}")
        check_target(self.budgets, self.measured_kl)


def check_target(budgets: Budgets, measured_kl: float | None) -> None:
    """Refuse an accuracy target that is not a positive finite KL, or that comes with other budgets."""
    if measured_kl is None:
        return
    if not (math.isfinite(measured_kl) and measured_kl > 0):
        raise ValueError(f"measured_kl must be a positive finite KL, got {measured_kl!r}")
    if budgets.given():
        raise ValueError(f"measured_kl asks for the smallest allocation that meets it: give it alone, "
                         f"without {budgets.describe()}")
