"""What a unit costs in a format: exact bytes, and decode latency on the target hardware.

Bytes come from ``Format.nbytes`` and are exact. Latency is for one decode step (batch 1
by default). When ``bench/kernels.py`` has measured a table for the hardware, the estimate
takes the measured throughput (bytes per microsecond) of the nearest measured shape with
the same width and group; otherwise it is a roofline: bytes over the hardware's memory
bandwidth plus a fixed per-kernel launch cost. ``LatencyModel.source`` says which one
produced the numbers, so a profile never passes an estimate off as a measurement.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bitalloc.quant.formats import Format
from bitalloc.quant.kv import kv_bytes_per_token
from bitalloc.quant.units import Unit

# Peak memory bandwidth (bytes/s) of common targets, from their data sheets.
BANDWIDTH = {
    "h100": 3.35e12,
    "h200": 4.8e12,
    "a100": 2.0e12,
    "l40s": 0.864e12,
    "rtx4090": 1.008e12,
    "cpu": 50e9,
}
KERNEL_OVERHEAD_S = 4e-6


def hardware_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: how latency tables are named."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# Measured tables that ship with the package (``bench/kernels.py`` writes here by default).
PACKAGED_LATENCY_DIR = Path(__file__).resolve().parent / "latency"


def latency_dirs() -> list[Path]:
    """Where measured tables are looked for: ``$BITALLOC_LATENCY_DIR``, then the packaged tables."""
    dirs = []
    if os.environ.get("BITALLOC_LATENCY_DIR"):
        dirs.append(Path(os.environ["BITALLOC_LATENCY_DIR"]))
    dirs.append(PACKAGED_LATENCY_DIR)
    return dirs


@dataclass
class LatencyModel:
    """Latency of a unit in a format on the target hardware (the GPU a model is served on, not
    where bitalloc computes), at one batch size."""

    hardware: str = "h100"
    batch: int = 1
    entries: list[dict] = field(default_factory=list)

    @classmethod
    def for_hardware(cls, hardware: str = "h100", batch: int = 1) -> "LatencyModel":
        """A measured model when a table for ``hardware`` exists, else the roofline."""
        slug = hardware_slug(hardware)
        for folder in latency_dirs():
            for path in sorted(folder.glob("kernels_*.json")):
                if slug in path.stem:
                    table = json.loads(path.read_text())
                    rows = [e for e in table.get("entries", []) if e.get("batch") == batch and e.get("us")]
                    if rows:
                        return cls(hardware, batch, rows)
        return cls(hardware, batch)

    @property
    def bandwidth(self) -> float:
        for key, value in BANDWIDTH.items():
            if key in hardware_slug(self.hardware):
                return value
        raise ValueError(f"unknown hardware {self.hardware!r} for a roofline; known: {sorted(BANDWIDTH)}")

    @property
    def source(self) -> str:
        if self.entries:
            return f"measured kernel table for {self.hardware} (batch {self.batch})"
        return f"roofline estimate for {self.hardware}: bytes / {self.bandwidth / 1e12:.2f} TB/s + {KERNEL_OVERHEAD_S * 1e6:.0f} us per kernel"

    def seconds(self, unit: Unit, fmt: Format, nbytes: int) -> float:
        """Seconds for one decode step of ``unit`` stored in ``fmt`` (``nbytes`` bytes)."""
        if self.entries and unit.kind == "weight":
            measured = self._nearest(unit, fmt)
            if measured is not None:
                return nbytes / measured + KERNEL_OVERHEAD_S
        return nbytes / self.bandwidth + (KERNEL_OVERHEAD_S if unit.kind == "weight" else 0.0)

    def _nearest(self, unit: Unit, fmt: Format) -> float | None:
        """Measured bytes per second of the closest-sized entry in the same format (fp16 for a kept unit)."""
        wanted = "fp16" if fmt.is_keep else fmt.name
        rows = [e for e in self.entries if e.get("format") == wanted]
        if not rows:
            return None
        size = unit.numel
        row = min(rows, key=lambda e: abs(e["n"] * e["k"] - size))
        return row["bytes"] / (row["us"] * 1e-6) if row.get("bytes") else None


def unit_bytes(unit: Unit, fmt: Format, *, context: int = 0, batch: int = 1) -> int:
    """Exact bytes of a unit in a format; a KV unit counts the tokens it caches at ``context``
    (its sliding window, if shorter) for ``batch`` sequences."""
    if unit.kind == "weight":
        return fmt.nbytes(unit.shape)
    return math.ceil(kv_bytes_per_token(unit, fmt) * unit.cached_tokens(context) * batch)
