"""Progress of ``quant.progress.ProgressFn`` callbacks: a terminal bar (one per phase) for the
CLI, plain lines when its output is a file or a pipe, and the tracker that turns them into a
job's stored progress for the service."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bitalloc.quant.progress import ProgressFn


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressFn]:
    """Yield a callback that shows progress on stderr: bars on a terminal, else plain lines
    (a bar redrawn in a log file or a pipe shows nothing until the end)."""
    if not sys.stderr.isatty():
        yield progress_lines(sys.stderr)
        return
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as bar:
        tasks: dict[str, int] = {}

        def report(done: int, total: int, phase: str) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield report


def progress_lines(stream: TextIO, every: float = 5.0, clock: Callable[[], float] = time.monotonic) -> ProgressFn:
    """A callback that writes ``[  12 s] phase  34 % (120/350), overall 41 %`` lines: when a phase
    starts, when it completes, and at most every ``every`` seconds in between."""
    tracker, start = ProgressTracker(), clock()
    last = {"at": float("-inf")}

    def report(done: int, total: int, phase: str) -> None:
        started = tracker.update(done, total, phase)
        now = clock()
        if not (started or done >= total or now - last["at"] >= every):
            return
        last["at"] = now
        share = f"{100 * done / total:3.0f} % ({done}/{total})" if total > 0 else ""
        stream.write(f"[{now - start:6.0f} s] {phase:<14} {share}, overall {tracker.percent:.0f} %\n")
        stream.flush()

    return report


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
