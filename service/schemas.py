"""The API's request and response bodies.

Everything a job can be told is validated here, before it is stored: a bad value is a
422 whose ``loc`` names the field and whose ``msg`` says why. What can only be known by
trying (an unknown model, a budget no allocation meets) fails the job with that reason.
"""

from __future__ import annotations

import inspect
import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from quant.costs import LatencyModel
from quant.formats import get_format
from quant.metrics import METRICS
from quant.profile import KVOptions
from search import SOLVERS
from service.pipeline import JobSpec


def _solvers() -> list[str]:
    """Solvers a job can name: those that need no options (``refine`` needs a measuring evaluator)."""
    return sorted(name for name, cls in SOLVERS.items()
                  if all(p.default is not p.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                         for p in list(inspect.signature(cls.__init__).parameters.values())[1:]))


def _format_name(name: str) -> str:
    return get_format(name).name


def _text(value: str) -> str:
    if any(ord(c) < 32 for c in value):
        raise ValueError("must not contain control characters")
    return value


FormatName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_format_name)]
Source = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_text)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetsIn(Strict):
    """Any of these limits; none means only the front is computed."""

    avg_bits: float | None = Field(None, gt=0, le=32, description="Max average bits per element (weights, and KV caches when included).")
    bytes: int | None = Field(None, gt=0, description="Max total bytes.")
    latency: float | None = Field(None, gt=0, description="Max predicted decode-step latency, seconds.")
    kl: float | None = Field(None, ge=0, description="Max predicted KL from the unquantized model; needs metric 'kl'.")
    error: float | None = Field(None, ge=0, description="Max predicted error in the metric's own units.")

    @field_validator("avg_bits", "latency", "kl", "error")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _one_error_budget(self) -> BudgetsIn:
        if self.kl is not None and self.error is not None:
            raise ValueError("give kl or error, not both (both limit the predicted error)")
        return self

    def pipeline_budgets(self) -> dict[str, float]:
        """The pipeline's budget keys (a KL budget is the error budget of the ``kl`` metric)."""
        given = {"avg_bits": self.avg_bits, "bytes": self.bytes, "latency": self.latency,
                 "error": self.kl if self.kl is not None else self.error}
        return {k: v for k, v in given.items() if v is not None}


class KVCacheIn(Strict):
    """Include each layer's K and V cache as units, costed at this context for this batch."""

    context: int = Field(4096, ge=1, le=1 << 20, description="Context length in tokens.")
    batch: int = Field(1, ge=1, le=4096, description="Sequences held in the cache.")


class CalibrationIn(Strict):
    source: Source | None = Field(None, description="zoo:calibration (default for LMs), zoo:digits, datasets:NAME:SPLIT, or a file inside the model roots.")
    samples: int = Field(32, ge=1, le=4096, description="Calibration windows (or input samples).")
    seq_len: int = Field(512, ge=8, le=32768, description="Tokens per calibration and evaluation window.")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class EvaluationIn(Strict):
    source: Source | None = Field("zoo:evaluation", description="Held-out text for the chosen point; null skips evaluation.")
    windows: int = Field(16, ge=1, le=4096, description="Held-out windows to score.")


class JobCreate(Strict):
    """A job: which model, which formats, how to measure, how to solve, within which budgets."""

    model: Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_text)] = Field(
        description="A local directory or .gguf inside the model roots, a hub id, zoo:NAME or factory:NAME.")
    formats: list[FormatName] = Field(min_length=1, max_length=32, description="Candidate formats, e.g. int4_g128.")
    metric: str = Field("output_mse", description=f"Sensitivity metric: {', '.join(sorted(METRICS))}.")
    solver: str = Field("dp", description=f"Solver for the point at the budget: {', '.join(_solvers())}.")
    method: Literal["rtn", "gptq"] = "rtn"
    budgets: BudgetsIn = Field(default_factory=BudgetsIn)
    points: int = Field(32, ge=2, le=512, description="Budgets swept for the front.")
    kv_cache: KVCacheIn | None = None
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    evaluation: EvaluationIn = Field(default_factory=EvaluationIn)
    device: str = Field("h100", min_length=1, max_length=64, description="Latency target device.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model": "zoo:llm", "formats": ["int3_g128", "int4_g128", "int8_g128"], "metric": "output_mse",
        "solver": "dp", "budgets": {"avg_bits": 4.25}}]})

    @field_validator("formats")
    @classmethod
    def _distinct(cls, formats: list[str]) -> list[str]:
        repeated = sorted({f for f in formats if formats.count(f) > 1})
        if repeated:
            raise ValueError(f"formats are listed twice: {repeated}")
        return formats

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
        return metric

    @field_validator("solver")
    @classmethod
    def _solver(cls, solver: str) -> str:
        if solver not in _solvers():
            raise ValueError(f"unknown solver {solver!r}; available: {_solvers()}")
        return solver

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        LatencyModel(device).bandwidth  # raises ValueError naming the known devices
        return device

    @field_validator("budgets")
    @classmethod
    def _kl_needs_kl_metric(cls, budgets: BudgetsIn, info: ValidationInfo) -> BudgetsIn:
        if budgets.kl is not None and info.data.get("metric", "kl") != "kl":
            raise ValueError("a kl budget needs metric 'kl' (budgets.error is in this metric's units)")
        return budgets

    def to_spec(self) -> JobSpec:
        """The pipeline's job spec."""
        kv = None if self.kv_cache is None else KVOptions(self.kv_cache.context, self.kv_cache.batch)
        return JobSpec(model=self.model, formats=list(self.formats), metric=self.metric, solver=self.solver,
                       method=self.method, budgets=self.budgets.pipeline_budgets(), points=self.points,
                       calibration=self.calibration.source, seq_len=self.calibration.seq_len,
                       samples=self.calibration.samples, seed=self.calibration.seed, kv=kv, device=self.device,
                       evaluation=self.evaluation.source, eval_windows=self.evaluation.windows)


class Progress(BaseModel):
    phase: str | None = None
    done: int = 0
    total: int = 0
    percent: float = 0.0


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    state: Literal["queued", "running", "succeeded", "failed", "canceled"]
    spec: dict[str, Any]
    progress: Progress
    error: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None
    result: dict[str, Any] | None = Field(None, description="Timings, whether the profile came from the cache, "
                                                            "the chosen point's id and its held-out evaluation.")


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class LogLine(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    level: str
    message: str


class PointOut(BaseModel):
    id: int
    rank: int
    avg_bits: float
    bytes: int
    error: float = Field(description="Predicted error (the profile's metric, summed over units).")
    latency: float | None = Field(description="Predicted decode-step latency, seconds.")
    measured_kl: float | None = Field(description="Measured KL once a refine step has measured this point.")
    on_front: bool
    chosen: bool = Field(description="The point solved at the job's budget.")


class PointDetail(PointOut):
    solver: str
    formats: dict[str, str] = Field(description="Unit name -> format name.")
    info: dict[str, Any]


class ProfileOut(BaseModel):
    key: str
    sha256: str
    model: str
    metric: str
    method: str
    units: int
    formats: list[str]
    latency_source: str | None


class FrontOut(BaseModel):
    job_id: uuid.UUID
    axes: list[str]
    solver: str
    profile: ProfileOut
    chosen_point_id: int | None
    points: list[PointOut]


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: str
    name: str
    media_type: str
    sha256: str
    size: int
    created_at: datetime
