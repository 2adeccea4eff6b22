"""Boundary states: the hidden states entering each decoder block, kept for a backward walk.

A gradient metric on a streamed model walks the blocks forward keeping, per calibration batch,
the hidden states entering every block, then walks back down from the head. Those states are
``blocks x tokens x hidden`` numbers: 16 GiB in fp32 for a 32-block model of width 4096 on 256
windows of 128 tokens, more than the weights of the block being run. So they stay in memory (on
the model's device) only up to a byte budget, and the blocks beyond it are written to a spill
file each (safetensors, in a private folder under ``BITALLOC_SPILL_DIR``, default the system's
temporary folder) and read back when the backward walk reaches them. A spill file is deleted
when its block is, and the folder when the states are closed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def spill_dir() -> Path:
    """Where spill folders are made (``BITALLOC_SPILL_DIR``, default the system's temporary folder)."""
    return Path(os.environ.get("BITALLOC_SPILL_DIR") or tempfile.gettempdir()).expanduser()


class BoundaryStates:
    """A list (indexable from either end, deletable) of per-batch tensor lists, one per block
    boundary, in memory while the held bytes stay within ``budget`` (None: no limit), else
    each in a spill file. Use it as a context manager, or ``close`` it, to remove the files."""

    def __init__(self, budget: int | None = None, device: torch.device | str = "cpu") -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget}")
        self.budget, self.device = budget, torch.device(device)
        self.held = 0
        self.spilled = 0  # how many boundaries were written to disk, ever
        self._slots: list[list[torch.Tensor] | Path] = []
        self._folder: Path | None = None

    def append(self, states: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in states)
        if self.budget is None or self.held + size <= self.budget:
            self._slots.append(list(states))
            self.held += size
            return
        if self._folder is None:
            folder = spill_dir()
            folder.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="bitalloc-states-", dir=folder))
        path = self._folder / f"{self.spilled:05d}.safetensors"
        save_file({str(b): t.detach().contiguous().cpu() for b, t in enumerate(states)}, str(path))
        self._slots.append(path)
        self.spilled += 1

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        slot = self._slots[index]
        if isinstance(slot, Path):
            tensors = load_file(str(slot), device=str(self.device))
            return [tensors[str(b)] for b in range(len(tensors))]
        return slot

    def __delitem__(self, index: int) -> None:
        slot = self._slots.pop(index)
        if isinstance(slot, Path):
            slot.unlink(missing_ok=True)
        else:
            self.held -= sum(t.numel() * t.element_size() for t in slot)

    def close(self) -> None:
        """Drop every boundary and remove the spill folder."""
        self._slots.clear()
        self.held = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> BoundaryStates:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
