"""The API's request and response bodies.

Everything a job can be told is validated here, before it is stored: a bad value is a
422 whose ``loc`` names the field and whose ``msg`` says why. What can only be known by
trying (an unknown model, a budget no allocation meets) fails the job with that reason.
"""

from __future__ import annotations

import inspect
import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from bitalloc.pipeline.baselines import BASELINE_SPECS, BaselineRequest
from bitalloc.pipeline.spec import KL_METRICS, JobSpec, check_target
from bitalloc.quant.costs import BANDWIDTH, LatencyModel
from bitalloc.quant.device import parse_bytes
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.metrics import METRICS
from bitalloc.quant.targets import TargetName
from bitalloc.search import Budgets, available


def _solvers() -> list[str]:
    """Solvers a job can name: those that need no options (``refine``, ``descent`` and ``surrogate`` need a measuring evaluator)."""
    return sorted(name for name, cls in available().items()
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


def _unicode(value: Any) -> None:
    """Refuse text that cannot be stored or sent back as UTF-8 (a lone surrogate such as ``\\ud800``)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    elif isinstance(value, list | tuple):
        for item in value:
            _unicode(item)


class Strict(BaseModel):
    """A request body: unknown fields, non-finite numbers and broken Unicode are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        _unicode(value)
        return value


class BudgetsIn(Strict):
    """Any of these limits; none means only the front is computed."""

    avg_bits: float | None = Field(None, gt=0, le=32, description="Max average bits per element (weights, and KV caches when included).")
    bytes: int | None = Field(None, gt=0, le=2**63 - 1, description="Max total bytes.")
    latency: float | None = Field(None, gt=0, description="Max predicted decode-step latency, seconds.")
    kl: float | None = Field(None, ge=0, description="Max predicted KL from the unquantized model; needs a metric in "
                                                     "KL units (fisher_mse or kl).")
    error: float | None = Field(None, ge=0, description="Max predicted error in the metric's own units.")
    measured_kl: float | None = Field(None, gt=0, description="Accuracy-target mode: the smallest allocation whose KL, "
                                      "measured on the tuning text (or the job's calibration text), is at most this "
                                      "with 95 % confidence over its windows (bisection over the front). Alone.")

    @model_validator(mode="after")
    def _one_error_budget(self) -> BudgetsIn:
        if self.kl is not None and self.error is not None:
            raise ValueError("give kl or error, not both (both limit the predicted error)")
        check_target(self.to_budgets(), self.measured_kl)
        return self

    def to_budgets(self) -> Budgets:
        """The predicted limits (a KL budget is the error budget of a metric in KL units)."""
        return Budgets(max_avg_bits=self.avg_bits, max_bytes=self.bytes, max_latency=self.latency,
                       max_error=self.kl if self.kl is not None else self.error)


class KVCacheIn(Strict):
    """Include each layer's K and V cache as units, costed at this context for this batch."""

    context: int = Field(4096, ge=1, le=1 << 20, description="Context length in tokens.")
    batch: int = Field(1, ge=1, le=4096, description="Sequences held in the cache.")


class CalibrationIn(Strict):
    source: Source | None = Field(None, description="zoo:calibration (default for LMs), zoo:digits, datasets:NAME:SPLIT, or a file inside the model roots.")
    samples: int = Field(32, ge=1, le=4096, description="Calibration windows (or input samples).")
    seq_len: int = Field(512, ge=8, le=32768, description="Tokens per calibration and evaluation window.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    bos: bool | None = Field(None, description="Start every calibration, fitness and evaluation window with the BOS "
                             "token: null does what the model's tokenizer does (BOS for Llama-3, Gemma, Mistral; none "
                             "for SmolLM2, Qwen2).")


class EvaluationIn(Strict):
    source: Source | None = Field("zoo:evaluation", description="Held-out text for the chosen point; null skips evaluation.")
    windows: int = Field(16, ge=1, le=4096, description="Held-out windows to score.")


class JobCreate(Strict):
    """A job: which model, which formats, how to measure, how to solve, within which budgets."""

    model: Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_text)] = Field(
        description="A local directory or .gguf inside the model roots, a hub id, zoo:NAME or factory:NAME.")
    formats: list[FormatName] = Field(min_length=1, max_length=32, description="Candidate formats, e.g. int4_g128.")
    metric: str = Field("fisher_mse", description=f"Sensitivity metric: {', '.join(sorted(METRICS))}. fisher_mse "
                        "predicts each cell's KL; output_mse suits modules whose outputs are not logits.",
                        json_schema_extra={"enum": sorted(METRICS)})
    solver: str = Field("dp", description=f"Solver for the point at the budget: {', '.join(_solvers())}.",
                        json_schema_extra={"enum": _solvers()})
    method: Literal["rtn", "gptq"] = Field("rtn", description="rtn (round to nearest), or gptq, the calibration-aware "
                                           "method: GPTQ for integer formats, llama.cpp's importance matrix (the "
                                           "calibration's mean squared activations, as llama-quantize --imatrix "
                                           "uses it) for ggml types.")
    budgets: BudgetsIn = Field(default_factory=BudgetsIn)
    points: int = Field(32, ge=2, le=512, description="Budgets swept for the front.")
    kv_cache: KVCacheIn | None = None
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    evaluation: EvaluationIn = Field(default_factory=EvaluationIn)
    hardware: str = Field("h100", min_length=1, max_length=64, description="The GPU the quantized model will be "
                          "served on: its memory bandwidth (or measured kernel table) predicts latency. "
                          f"Known: {', '.join(sorted(BANDWIDTH))}.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="What the model runs in while "
                                                           "the job measures it (auto: bf16 on a GPU, fp32 on the "
                                                           "CPU); Hessian, Fisher and KL sums accumulate in fp32 or "
                                                           "wider.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="Where the worker computes: auto "
                        "(its first CUDA GPU when it has one, else cpu), cpu, cuda or cuda:N. Not `hardware`, the GPU "
                        "latency is predicted for.")
    max_memory: int | str | None = Field(None, description="Memory the model's weights may take on the device, in "
                                         "bytes or like \"24GiB\" (default: what the device has free); a local "
                                         "model whose weights do not fit is profiled block by block.")
    stream: bool = Field(False, description="Profile a local model block by block even when its weights fit.")
    shards: int = Field(1, ge=1, le=1024, description="Measure a streamed profile in this many block ranges, each a "
                        "job of its own that any worker may take (the job's own worker takes them too); the cells "
                        "are the same however many. Needs a streamed model.")
    baseline: str | None = Field(None, max_length=100, description="Choose the point by a published rule instead "
                                 f"of solving: {', '.join(BASELINE_SPECS)}.")
    ties: bool = Field(True, description="Keep each tie group (fused q/k/v, gate/up) in one format, as vLLM needs; "
                       "false for runtimes that store them apart, such as llama.cpp.")
    descend: int = Field(0, ge=0, le=20, description="At most this many measured descent steps from the chosen "
                         "point: each solves the KL's local model (its gradient there) exactly and is kept only if "
                         "its KL on calibration text is lower; 0 skips them. Needs a metric in KL units.")
    surrogate: int = Field(0, ge=0, le=50, description="Rounds of the measured interaction surrogate from the "
                           "chosen point (after any descent steps): about 24 allocations near it and HAWQ-V3's are "
                           "measured, a model of KL with pairwise terms is fitted and solved exactly, its answer "
                           "measured and the model refitted, each round; kept only if confirmed on other windows. "
                           "0 skips it.")
    refine: int = Field(0, ge=0, le=500, description="Generations of measured (EvoPress-style) refinement of the "
                        "chosen point (after any descent steps), by KL on calibration text; 0 skips it.")

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

    @field_validator("hardware")
    @classmethod
    def _hardware(cls, hardware: str) -> str:
        LatencyModel(hardware).bandwidth  # raises ValueError naming the known hardware
        return hardware

    @field_validator("device", mode="before")
    @classmethod
    def _device_is_not_hardware(cls, device: object) -> object:
        if isinstance(device, str) and device in BANDWIDTH and device != "cpu":
            raise ValueError(f"device is where the job computes (auto, cpu, cuda, cuda:N); the latency target is "
                             f"named hardware: send \"hardware\": {json.dumps(device)}")
        return device

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, max_memory: int | str | None) -> int | None:
        return None if max_memory is None else parse_bytes(max_memory)

    @field_validator("budgets")
    @classmethod
    def _kl_needs_kl_metric(cls, budgets: BudgetsIn, info: ValidationInfo) -> BudgetsIn:
        if budgets.kl is not None and info.data.get("metric", "kl") not in KL_METRICS:
            raise ValueError(f"a kl budget needs a metric in KL units {KL_METRICS} (budgets.error is in this metric's units)")
        return budgets

    @field_validator("descend")
    @classmethod
    def _descend_needs_kl_metric(cls, descend: int, info: ValidationInfo) -> int:
        if descend and info.data.get("metric", "kl") not in KL_METRICS:
            raise ValueError(f"descent weighs its gradient steps against the profile's error: give a metric in KL units {KL_METRICS}")
        return descend

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, baseline: str | None, info: ValidationInfo) -> str | None:
        if baseline is None:
            return None
        request = BaselineRequest.parse(baseline)  # ValueError names the accepted forms
        missing = sorted(set(request.formats()) - set(info.data.get("formats", [])))
        if missing:
            raise ValueError(f"baseline {baseline!r} names formats {missing} that are not among formats")
        budgets = info.data.get("budgets")
        if request.needs_target and (budgets is None or budgets.avg_bits is None):
            raise ValueError(f"baseline {baseline!r} mixes formats up to a target: give budgets.avg_bits")
        return baseline

    def to_spec(self) -> JobSpec:
        """The pipeline's job spec."""
        kv = None if self.kv_cache is None else KVOptions(self.kv_cache.context, self.kv_cache.batch)
        return JobSpec(model=self.model, formats=list(self.formats), metric=self.metric, solver=self.solver,
                       method=self.method, budgets=self.budgets.to_budgets(), measured_kl=self.budgets.measured_kl,
                       points=self.points,
                       calibration=self.calibration.source, seq_len=self.calibration.seq_len,
                       samples=self.calibration.samples, seed=self.calibration.seed, bos=self.calibration.bos,
                       kv=kv, hardware=self.hardware, dtype=self.dtype, device=self.device,
                       max_memory=self.max_memory, stream=self.stream, shards=self.shards,  # type: ignore[arg-type]
                       evaluation=self.evaluation.source, eval_windows=self.evaluation.windows,
                       baseline=self.baseline, descend=self.descend, refine=self.refine, ties=self.ties,
                       surrogate=self.surrogate)


class Progress(BaseModel):
    phase: str | None = None
    done: int = 0
    total: int = 0
    percent: float = 0.0


class ShardOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    blocks: tuple[int, int] = Field(description="The decoder blocks it measures: first, and one past the last.")
    state: Literal["queued", "running", "succeeded", "failed", "canceled"]
    attempts: int
    percent: float
    error: str | None


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
    shards: list[ShardOut] = Field(default_factory=list, description="The block-range shards of a streamed profile "
                                   "measured by several workers (`shards` > 1), in order; empty otherwise.")


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
    measured_kl: float | None = Field(description="Measured KL once a descent, surrogate or refine step has measured this point.")
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


class UnitOut(BaseModel):
    name: str
    kind: Literal["weight", "kv_key", "kv_value"]
    block: int | None = Field(description="The transformer block the unit belongs to; null outside blocks (lm_head).")
    column: str = Field(description="Heatmap column: the shortest name suffix unique in its block, or K cache / V cache.")
    shape: list[int]
    numel: int
    context: int | None = Field(None, description="KV units: the tokens this cache holds at the job's context "
                                "(a sliding-window layer's window, if shorter); null for weights.")


class FormatBits(BaseModel):
    name: str
    bits: int = Field(description="Bits per code.")
    bits_per_weight: float = Field(description="Bits per element with scales and offsets, over this model's weights.")


class UnitsOut(BaseModel):
    units: list[UnitOut]
    formats: list[FormatBits]


class BaselinePoint(BaseModel):
    name: str = Field(description="What the baseline is, e.g. 'uniform int4_g128'.")
    kind: str = Field(description="The family it belongs to (uniform, ...), drawn with its own marker.")
    avg_bits: float
    bytes: int
    error: float
    latency: float | None
    measured_kl: float | None


class BaselinesOut(BaseModel):
    points: list[BaselinePoint]


class BuildCreate(Strict):
    """How to quantize the point's artifact."""

    method: Literal["rtn", "gptq"] = Field("rtn", description="rtn, or gptq (fits integer units on the job's "
                                                               "calibration set; ggml types get llama.cpp's "
                                                               "importance matrix of it, --imatrix).")
    target: TargetName = Field("bitalloc", description="What to write: bitalloc (the packed artifact for bitalloc's "
                                                       "kernels), gguf (a GGUF made by llama.cpp's llama-quantize) "
                                                       "or compressed-tensors (a checkpoint that vLLM "
                                                       "loads).")


class BuildArtifact(BaseModel):
    """The built artifact: a tar of the artifact folder; download it from ``/v1/artifacts/{id}``."""

    id: uuid.UUID
    name: str
    sha256: str
    size: int


class BuildOut(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID = Field(description="The job whose point is built.")
    point_id: int
    method: Literal["rtn", "gptq"]
    target: TargetName
    state: Literal["queued", "running", "succeeded", "failed", "canceled"]
    progress: Progress
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifact: BuildArtifact | None = Field(description="Set once the build succeeded.")
