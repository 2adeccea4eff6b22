"""The job spec: everything one job needs, as the REST API and the CLI hand it to ``run_job``.

Budgets are validated here, once: the keys a job may bound, in the units users think in,
and the measured KL target, which stands alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bitalloc.quant.profile import KVOptions
from bitalloc.quant.quantizers import Method
from bitalloc.search import Budgets

BUDGET_KEYS = {"avg_bits": "max_avg_bits", "bytes": "max_bytes", "latency": "max_latency", "error": "max_error"}
MEASURED = "measured_kl"  # a budget on KL measured by the model itself, not predicted by the profile
KL_METRICS = ("fisher_mse", "kl")  # metrics whose cells are KL in nats per token


@dataclass
class JobSpec:
    """Everything a job needs; the REST API and the CLI build one of these."""

    model: str
    formats: list[str]
    metric: str = "fisher_mse"
    solver: str = "dp"
    method: Method = "rtn"
    budgets: dict[str, float] = field(default_factory=dict)
    points: int = 32
    calibration: str | None = None
    seq_len: int = 512
    samples: int = 32
    seed: int = 0
    kv: KVOptions | None = None
    device: str = "h100"
    evaluation: str | None = "zoo:evaluation"
    eval_windows: int = 16
    baseline: str | None = None
    refine: int = 0
    descend: int = 0
    fitness_windows: int = 8
    gradient_windows: int = 8
    ties: bool = True

    @property
    def fitness_source(self) -> str:
        """The text measured search scores candidates on: the job's own calibration text (at
        other offsets) or, by default, the reference tuning split, which holds both kinds of
        text the reference evaluation does."""
        return self.calibration or "zoo:tuning"

    def budgets_object(self) -> Budgets:
        unknown = set(self.budgets) - set(BUDGET_KEYS) - {MEASURED}
        if unknown:
            raise ValueError(f"budgets: unknown keys {sorted(unknown)}; known: {sorted(BUDGET_KEYS) + [MEASURED]}")
        if MEASURED in self.budgets and len(self.budgets) > 1:
            raise ValueError(f"budgets: {MEASURED} asks for the smallest allocation that meets it; give it alone")
        return Budgets(**{BUDGET_KEYS[k]: v for k, v in self.budgets.items() if k != MEASURED})
