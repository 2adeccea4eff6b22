"""Artifacts on disk, addressed by the sha256 of their bytes.

The same bytes are stored once, whoever asks; a write goes to a temporary file that is
renamed into place, so a reader never sees half a file and a crash leaves at most an
orphan temp file. The database holds who owns what (``service.models.Artifact``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            self._place(sha256, lambda handle: handle.write(data))
        return sha256

    def put_file(self, source: str | Path) -> tuple[str, int]:
        """Store a copy of ``source``; returns its sha256 and size."""
        digest = hashlib.sha256()
        with open(source, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        sha256 = digest.hexdigest()
        if not self.exists(sha256):
            def copy(out) -> None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)

            self._place(sha256, copy)
        return sha256, self.path(sha256).stat().st_size

    def _place(self, sha256: str, write: Callable[[BinaryIO], object]) -> None:
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
