"""Artifacts on disk, addressed by the sha256 of their bytes.

The same bytes are stored once, whoever asks; a write goes to a temporary file that is
renamed into place, so a reader never sees half a file and a crash leaves at most an
orphan temp file. The database holds who owns what (``service.models.ArtifactRecord``), so the
store never decides alone what to delete: ``service.garbage`` asks the database, then calls
``remove``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TEMP_PREFIX = ".tmp-"


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
        if not self._reuse(sha256):
            self._place(sha256, lambda handle: handle.write(data))
        return sha256

    def put_file(self, source: str | Path) -> tuple[str, int]:
        """Store a copy of ``source``; returns its sha256 and size."""
        digest = hashlib.sha256()
        with open(source, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        sha256 = digest.hexdigest()
        if not self._reuse(sha256):
            def copy(out) -> None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)

            self._place(sha256, copy)
        return sha256, self.path(sha256).stat().st_size

    def remove(self, sha256: str) -> bool:
        """Delete the blob's file; False when it was not there (so removing twice is harmless).

        Refuses (``ValueError``) when a fan-out folder is a link leading elsewhere, so nothing
        outside the root is ever deleted. The fan-out folders stay even when empty: removing
        one could pull it from under a concurrent ``_place`` between its ``mkdir`` and its
        temporary file, and there are at most 256 + 65536 of them.
        """
        path = self.path(sha256)
        if path.parent.resolve() != self.root.resolve() / sha256[:2] / sha256[2:4]:
            raise ValueError(f"{path.parent} leads outside the store {self.root}")
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def blobs(self) -> Iterator[str]:
        """The sha256 of every stored file (what a sweep for orphans looks at)."""
        for entry in self._entries():
            if _SHA256.match(entry.name) and Path(entry.path).parent == self.path(entry.name).parent:
                yield entry.name

    def temporaries(self) -> Iterator[Path]:
        """The temporary files of writes in progress, or of writes a crash interrupted."""
        for entry in self._entries():
            if entry.name.startswith(TEMP_PREFIX):
                yield Path(entry.path)

    def _entries(self) -> Iterator[os.DirEntry]:
        """The plain files in the fan-out folders; links are not followed, so nothing outside the
        root is listed (and so nothing outside it is offered for removal)."""
        for first in _folders(self.root):
            for second in _folders(first):
                with os.scandir(second) as entries:
                    files = [entry for entry in entries if entry.is_file(follow_symlinks=False)]
                yield from files

    def _reuse(self, sha256: str) -> bool:
        """True when the blob is stored already. Its modification time is renewed, so a sweep
        does not take bytes that a writer is about to record again for an old orphan (see
        ``service.garbage``); a store that cannot be touched (read-only) is reused as it is."""
        path = self.path(sha256)
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except OSError:
            pass
        return path.is_file()

    def _place(self, sha256: str, write: Callable[[BinaryIO], object]) -> None:
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=TEMP_PREFIX, delete=False) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)


def _folders(path: Path | str) -> list[str]:
    """The sub-folders of ``path`` (none when it does not exist), links not followed."""
    try:
        with os.scandir(path) as entries:
            return [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
