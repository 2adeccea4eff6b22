"""The manifest: what an artifact holds and the hashes that prove it is intact.

The manifest is the artifact's table of contents and its integrity record: every tensor's
dtype, shape and sha256, every file's size and sha256, each unit's format and how it was
quantized, and the provenance (model spec, bitalloc version, method, calibration hash) that
says where the numbers came from. A loader trusts nothing the manifest does not vouch for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "bitalloc_artifact.json"
WEIGHTS = "weights.safetensors"
LAYOUT = "bitalloc-artifact/2"
READABLE = ("bitalloc-artifact/1", LAYOUT)
"""/1 keeps every tensor in ``WEIGHTS``; /2 names its weights files (``weights``: one, or one per
block when the model was streamed) and each tensor's file."""


class ArtifactError(ValueError):
    """An artifact that cannot be built or loaded (bad allocation, corrupt or missing files), in words."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (any dtype, bf16 and float8 included)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Artifact:
    """A quantized model on disk: its folder and its manifest."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path | str) -> Artifact:
        """Read an artifact's manifest (not its tensors: ``load_artifact`` verifies and loads those)."""
        path = Path(path).expanduser()
        file = path / MANIFEST
        if not path.is_dir():
            raise ArtifactError(f"artifact folder {path} does not exist")
        if not file.is_file():
            raise ArtifactError(f"{path} is not a bitalloc artifact: {MANIFEST} is missing")
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{file}: not valid JSON ({exc}); the artifact is corrupt") from exc
        if not isinstance(manifest, dict) or manifest.get("layout") not in READABLE:
            found = manifest.get("layout") if isinstance(manifest, dict) else None
            raise ArtifactError(f"{file}: layout {found!r} is not one this bitalloc reads ({', '.join(READABLE)})")
        return cls(path, manifest)

    @property
    def weights(self) -> list[str]:
        """The files holding the tensors."""
        return list(self.manifest.get("weights", [WEIGHTS]))

    @property
    def allocation(self) -> dict[str, str]:
        """Unit name -> format name, as it was built."""
        return dict(self.manifest["allocation"])

    @property
    def predicted_bytes(self) -> int:
        """``Format.nbytes`` over the units plus the unquantized tensors' bytes: what the budgets counted."""
        return int(self.manifest["bytes"]["predicted"])

    @property
    def disk_bytes(self) -> int:
        """Every file of the artifact (manifest included) as it lies on disk."""
        return sum(f["bytes"] for f in self.manifest["files"].values()) + (self.path / MANIFEST).stat().st_size
