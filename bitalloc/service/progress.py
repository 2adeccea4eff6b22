"""Progress of ``quant.progress.ProgressFn`` callbacks: a terminal bar (one per phase) for the
CLI, and the tracker that turns them into a job's stored progress for the service."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bitalloc.quant.progress import ProgressFn


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressFn]:
    """Yield a callback that draws ``phase [####   ] done/total`` on stderr."""
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as bar:
        tasks: dict[str, int] = {}

        def report(done: int, total: int, phase: str) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield report


# Where each phase of ``run_job`` sits on the 0-100 scale: the profile's metric phases (any
# name not listed: output_mse, fisher, kl, ...) take the widest band because they dominate.
# An artifact build has its own phases: load, hessians (GPTQ), quantize, pack.
PHASE_BANDS: dict[str, tuple[float, float]] = {
    "load": (0.0, 10.0), "hessians": (10.0, 25.0), "kv_kl": (75.0, 85.0), "solve": (85.0, 90.0),
    "evaluate": (90.0, 100.0), "quantize": (25.0, 90.0), "pack": (90.0, 100.0),
}
METRIC_BAND = (25.0, 75.0)


class ProgressTracker:
    """Turns ``progress(done, total, phase)`` calls into the job's progress record
    (phase, unit i of n, overall percent) and notes when a new phase starts.

    The percent never goes back, so a metric that reports its own sub-steps, or a phase
    that repeats, cannot make a client's progress bar jump backwards.
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        self.done = 0
        self.total = 0
        self.percent = 0.0

    def update(self, done: int, total: int, phase: str) -> bool:
        """Record one report; True when it starts a new phase."""
        started = phase != self.phase
        low, high = PHASE_BANDS.get(phase, METRIC_BAND)
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        self.phase, self.done, self.total = phase, done, total
        self.percent = max(self.percent, round(low + (high - low) * fraction, 1))
        return started

    def finish(self) -> None:
        self.percent = 100.0

    def snapshot(self) -> dict:
        return {"phase": self.phase, "done": self.done, "total": self.total, "percent": self.percent}
