"""The job spec: everything one job needs, as the REST API and the CLI hand it to ``run_job``.

A job's limits are one ``search.Budgets`` (predicted size, latency and error) plus, apart
from them, the accuracy target ``measured_kl``: KL measured by running the model, which asks
for the smallest allocation that meets it and so stands alone. ``check_target`` is the one
place that says so; the REST schema and the CLI call it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

from bitalloc.quant.device import check_device_name
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.loading import model_dtype
from bitalloc.quant.quantizers import Method
from bitalloc.search import Budgets

KL_METRICS = ("fisher_mse", "kl")  # metrics whose cells are KL in nats per token

_Data = TypeVar("_Data")


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
    shards: int = 1  # block ranges a streamed profile is measured in (quant.shards); the numbers do not change
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
        if self.shards < 1:
            raise ValueError(f"shards must be at least 1, got {self.shards}")
        for name in ("descend", "surrogate", "refine"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (none) or a positive count, got {getattr(self, name)}")
        check_target(self.budgets, self.measured_kl)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-safe data: the service stores it when it accepts a job and the worker
        runs it as stored (``from_dict``), so a job runs as it was accepted even after the API's
        schema changes."""
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        return {**data, "formats": list(self.formats), "budgets": asdict(self.budgets),
                "kv": None if self.kv is None else asdict(self.kv)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """The spec ``to_dict`` stored. A key it does not know is refused, not dropped: a job never
        runs with part of what it was told silently ignored."""
        values = dict(_checked_keys(cls, data, "job spec"))
        if "budgets" in values:
            values["budgets"] = _dataclass_of(Budgets, values["budgets"], "budgets")
        if values.get("kv") is not None:
            values["kv"] = _dataclass_of(KVOptions, values["kv"], "kv")
        return cls(**values)


def _checked_keys(cls: type, data: object, what: str) -> Mapping[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``, or a ValueError naming the unknown
    or missing keys (instead of the TypeError a bad call would raise)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    names = {item.name for item in fields(cls)}
    required = {item.name for item in fields(cls) if item.default is MISSING and item.default_factory is MISSING}
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}")
    if missing:
        raise ValueError(f"{what} lacks the keys {missing}")
    return data


def _dataclass_of(cls: type[_Data], data: object, what: str) -> _Data:
    return cls(**_checked_keys(cls, data, what))


def check_target(budgets: Budgets, measured_kl: float | None) -> None:
    """Refuse an accuracy target that is not a positive finite KL, or that comes with other budgets."""
    if measured_kl is None:
        return
    if not (math.isfinite(measured_kl) and measured_kl > 0):
        raise ValueError(f"measured_kl must be a positive finite KL, got {measured_kl!r}")
    if budgets.given():
        raise ValueError(f"measured_kl asks for the smallest allocation that meets it: give it alone, "
                         f"without {budgets.describe()}")
