"""Baselines: allocations a job's front is compared against, on the same profile.

A front is only convincing beside what a user would have done without it. Each baseline is
an allocation of the job's own problem, so its totals come from the same profile as the
front's points and are drawn on the same axes. ``kind`` groups baselines for the legend.
The dashboard draws those a profile alone determines (uniform, llama.cpp's mixes); a job may
also name any baseline (``BaselineRequest``) to have it as its chosen, evaluated point,
including those that need a model pass (HAWQ-V3's traces, NNCF's activation scores).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitalloc.pipeline.problem import problem_of
from bitalloc.quant.gguf_names import gguf_kind
from bitalloc.quant.profile import Profile
from bitalloc.quant.sensitivity import DEFAULT_WITH_DATA as NNCF_CRITERION
from bitalloc.quant.units import Unit
from bitalloc.search import Allocation, Budgets, Problem
from bitalloc.search.baselines import (
    FTYPES,
    ModelInfo,
    UnitInfo,
    hawq_v3,
    layer_mix,
    llamacpp,
    nncf_ratio,
    rescore,
    uniform,
)


def baseline_point(name: str, kind: str, allocation: Allocation) -> dict[str, Any]:
    """The figures of one baseline, in the shape of a front point (``measured_kl`` once measured)."""
    return {"name": name, "kind": kind, "avg_bits": allocation.avg_bits, "bytes": allocation.bytes,
            "error": allocation.error, "latency": allocation.latency, "measured_kl": allocation.measured}


def uniform_points(problem: Problem) -> list[dict[str, Any]]:
    """Every unit in one format, for each format that every unit allows."""
    n = problem.n_units
    return [baseline_point(f"uniform {name}", "uniform", Allocation.of(problem, [f] * n, solver="uniform"))
            for f, name in enumerate(problem.format_names) if problem.allowed[:, f].all()]


def llamacpp_points(problem: Problem, units: Sequence[Unit]) -> list[dict[str, Any]]:
    """llama.cpp's mixes as ``llama-quantize`` writes them, mapped onto the profile's formats.

    Only for a weights-only profile whose every unit has a GGUF name: the rules are written
    for GGUF tensors, and KV caches are set globally at run time, not per tensor.
    """
    if any(u.kind != "weight" or gguf_kind(u.name) is None for u in units):
        return []
    infos, model = unit_infos(units), model_info(units)
    points = []
    for ftype in FTYPES:
        try:
            allocation = llamacpp(problem, infos, ftype, model)
        except ValueError:  # a type the profile's formats cannot stand in for
            continue
        points.append(baseline_point(f"llama.cpp {ftype}", "llama.cpp", allocation))
    return points


def baseline_points(profile: Profile) -> list[dict[str, Any]]:
    """The baselines a profile alone determines (no model pass), smallest first."""
    problem = problem_of(profile)
    points = uniform_points(problem) + llamacpp_points(problem, profile.units)
    return sorted(points, key=lambda p: (p["bytes"], p["name"]))


def unit_infos(units: Sequence[Unit]) -> dict[str, UnitInfo]:
    """What the published rules read of each weight unit: its block, GGUF kind and row length."""
    return {u.name: UnitInfo(block=u.block, kind=gguf_kind(u.name), row=u.shape[1]) for u in units if u.kind == "weight"}


def model_info(units: Sequence[Unit]) -> ModelInfo:
    """The model-wide facts llama.cpp's rules read, derived from the units alone.

    The block count is one past the largest block index; grouped-query attention shows as
    query rows over key rows (heads x head_dim over kv_heads x head_dim); a separate output
    projection exists when a unit is GGUF's ``output`` (tied embeddings have none).
    """
    weights = [u for u in units if u.kind == "weight"]
    blocks = [u.block for u in weights if u.block is not None]
    rows = {gguf_kind(u.name): u.shape[0] for u in weights if u.block == (min(blocks) if blocks else None)}
    n_gqa = rows["attn_q"] // rows["attn_k"] if rows.get("attn_q") and rows.get("attn_k") else 1
    return ModelInfo(n_blocks=max(blocks) + 1 if blocks else 1, n_gqa=max(n_gqa, 1),
                     has_output=any(gguf_kind(u.name) == "output" for u in weights))


BASELINE_SPECS = ("uniform:FORMAT", "layers:LOW/HIGH", "llama.cpp:FTYPE", "llama.cpp-plain:FTYPE", "hawq_v3",
                  "nncf:LOW/HIGH")


@dataclass(frozen=True)
class BaselineRequest:
    """A baseline a job names, e.g. ``llama.cpp:Q4_K_M`` or ``layers:int4_g128/int5_g128``."""

    kind: str
    argument: str | None

    @classmethod
    def parse(cls, text: str) -> BaselineRequest:
        kind, _, argument = text.partition(":")
        needs = {"uniform": True, "layers": True, "llama.cpp": True, "llama.cpp-plain": True, "hawq_v3": False,
                 "nncf": True}
        if kind not in needs or needs[kind] != bool(argument):
            raise ValueError(f"baseline {text!r}: expected one of {', '.join(BASELINE_SPECS)}")
        if kind in ("llama.cpp", "llama.cpp-plain") and argument not in FTYPES:
            raise ValueError(f"baseline {text!r}: unknown llama.cpp type; known: {', '.join(FTYPES)}")
        if kind in ("layers", "nncf") and argument.count("/") != 1:
            raise ValueError(f"baseline {text!r}: give two formats as LOW/HIGH")
        return cls(kind, argument or None)

    @property
    def needs_target(self) -> bool:
        return self.kind in ("layers", "hawq_v3", "nncf")

    def formats(self) -> list[str]:
        """The formats the baseline names (each must be among the job's formats)."""
        if self.kind == "uniform":
            return [self.argument]
        return self.argument.split("/") if self.kind in ("layers", "nncf") else []


def named_baseline(request: BaselineRequest, problem: Problem, units: Sequence[Unit], target_avg_bits: float | None,
                   *, trace_problem: Callable[[], Problem], scores: Callable[[], Mapping[str, float]]) -> Allocation:
    """The allocation of a named baseline on the job's problem.

    HAWQ-V3 needs a Hessian-trace profile and NNCF per-unit scores: the caller supplies them
    lazily, because both cost a pass over the model that other baselines do not need.
    """
    if request.needs_target and target_avg_bits is None:
        raise ValueError(f"baseline {request.kind} needs an avg_bits budget: it mixes formats up to a target")
    infos = unit_infos(units)
    if request.kind == "uniform":
        return uniform(problem, request.argument)
    if request.kind == "layers":
        low, high = request.formats()
        return layer_mix(problem, infos, low, high, target_avg_bits)
    if request.kind in ("llama.cpp", "llama.cpp-plain"):
        return llamacpp(problem, infos, request.argument, model_info(units), fallback=request.kind == "llama.cpp")
    if request.kind == "hawq_v3":
        return rescore(hawq_v3(trace_problem(), Budgets(max_avg_bits=target_avg_bits)), problem)
    low, high = request.formats()
    return nncf_ratio(problem, infos, scores(), low, high, target_avg_bits=target_avg_bits, criterion=NNCF_CRITERION)
