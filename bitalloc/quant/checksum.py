"""A file's sha256, read in chunks: what artifacts record per file, what the zoo checks its
downloads against, and what identifies a streamed checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
