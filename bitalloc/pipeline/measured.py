"""Allocations measured on a job's fitness windows, kept beside the profile they were measured
for: a surrogate search at another budget of the same profile and windows fits on them instead
of measuring them again.

What an allocation measures depends on the model, its compute device and dtype, the quantizer
and its calibration (GPTQ's Hessians): everything the profile's key covers, and on the fitness
windows, whose exact tokens their description hashes. So the file's name is a hash of the two,
and its contents name the units and formats its choices index, so that no reader can misread
them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bitalloc.search import Problem

Measured = dict[tuple[int, ...], np.ndarray]


class MeasuredAllocations:
    """One file of measured allocations (per-unit choices and their window values)."""

    def __init__(self, directory: Path, profile_key: str, fitness: Mapping) -> None:
        digest = hashlib.sha256(json.dumps({"profile": profile_key, "fitness": dict(fitness)}, sort_keys=True).encode())
        self.path = Path(directory) / f"measured-{digest.hexdigest()}.npz"

    def load(self, problem: Problem) -> Measured:
        """What was measured for ``problem``'s units and formats; empty when nothing was (or the
        file describes other units: then it is ignored, never misread)."""
        if not self.path.exists():
            return {}
        with np.load(self.path, allow_pickle=False) as data:
            if list(data["units"]) != list(problem.unit_names) or list(data["formats"]) != list(problem.format_names):
                return {}
            return {tuple(int(f) for f in choice): values for choice, values in zip(data["choices"], data["values"])}

    def save(self, measured: Measured, problem: Problem) -> Path:
        """Write every measured allocation (atomically: a reader sees the old file or the new)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as out:
            np.savez(out, units=np.array(problem.unit_names), formats=np.array(problem.format_names),
                     choices=np.array(list(measured), dtype=np.int64).reshape(len(measured), problem.n_units),
                     values=np.array(list(measured.values()), dtype=np.float64))
        os.replace(partial, self.path)
        return self.path
