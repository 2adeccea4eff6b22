"""Progress reporting shared by long computations: ``progress(done, total, phase)``."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int, str], None]


def no_progress(_done: int, _total: int, _phase: str) -> None:
    """The default callback: report nothing."""
