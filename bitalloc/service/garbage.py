"""Stored bytes that no row names any more: removed once the delete that dropped their last
row has committed, and swept for orphans by the operator (``bitalloc gc``).

A blob is referenced while an ``ArtifactRecord``, a ``ProfileRecord`` or a ``ShardRecord`` (a
shard's shared quantities and measured rows, kept with its parent job) names its sha256. Profiles
count because they are a shared cache that outlives the jobs that made it: deleting a job
deletes its ``profile`` artifact record, never the profile other jobs' fronts read.

Order. The rows go first, in their transaction; the files go only after it committed, and
only those no row names in a fresh look at the database. A rollback therefore never leaves a
row pointing at a missing file; a crash between the commit and the removal leaves an orphan
file, which the sweep finds.

Concurrency. A writer stores bytes (``BlobStore.put_*``) and commits its row afterwards, so
for a moment a blob it needs is named by no row. What keeps such a blob:

- A writer that comes after a removal writes the file again: ``put_*`` writes whatever is
  missing.
- A writer that finds the file already there renews its modification time, and a file
  written or renewed after the removal began (``older_than``) is left for a later sweep
  (so is one whose time runs ahead of this machine's clock, on a store shared over the
  network: a leak the sweep mends, never a loss).
- The sweep only takes files untouched for ``min_age`` seconds (an hour by default), far
  longer than any writer holds bytes before committing their row.

What remains: a writer that found the file present before a removal began and commits its
row only after the removal looked at the database, or whose put lands between the removal's
last look at the file and its unlink (microseconds). Its row then names missing bytes: the
download answers 410, a configuration is written again at its next request, a profile by the
next job with its key. Bytes shared across jobs are configurations without provenance and
profiles; a model tar names its own job and point, so only its own job refers to it, and
that job cannot be deleted while the build runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from bitalloc.service.models import ArtifactRecord, ProfileRecord, ShardRecord
from bitalloc.service.storage import BlobStore

log = logging.getLogger("bitalloc.garbage")

REFERENCES = (ArtifactRecord.sha256, ProfileRecord.sha256, ShardRecord.inputs_sha256, ShardRecord.rows_sha256)
IN_CHUNK = 500  # SQLite and PostgreSQL both bound how many parameters one IN (...) takes


def referenced(session: Session, candidates: Iterable[str]) -> set[str]:
    """The candidates some row of ``REFERENCES`` names."""
    wanted = sorted(set(candidates))
    found: set[str] = set()
    for start in range(0, len(wanted), IN_CHUNK):
        chunk = wanted[start:start + IN_CHUNK]
        for column in REFERENCES:
            found.update(session.scalars(select(column).where(column.in_(chunk)).distinct()))
    return found


def remove_unreferenced(sessions: sessionmaker[Session], store: BlobStore, candidates: Iterable[str], *,
                        older_than: float | None = None, dry_run: bool = False) -> dict[str, int]:
    """Remove the candidates' files that no row names now and that were last written before
    ``older_than`` (a Unix time; default: now, as this call starts). Returns sha256 -> bytes of
    what was removed (or would be, with ``dry_run``).

    Call it only after the transaction that deleted the rows committed, never inside it.
    """
    cutoff = time.time() if older_than is None else older_than
    candidates = set(candidates)
    with sessions() as session:
        live = referenced(session, candidates)
    removed: dict[str, int] = {}
    for sha256 in sorted(candidates - live):
        stat = _stat(store.path(sha256))
        if stat is not None and stat.st_mtime < cutoff and (dry_run or store.remove(sha256)):
            removed[sha256] = stat.st_size
    return removed


def after_delete(sessions: sessionmaker[Session], store: BlobStore, candidates: Iterable[str]) -> None:
    """Remove what a committed delete left unreferenced. The delete stands whatever happens here:
    a failure is logged and leaves orphans for ``bitalloc gc``, never an error for the caller."""
    try:
        remove_unreferenced(sessions, store, candidates)
    except (OSError, ValueError, SQLAlchemyError):
        log.exception("removing the blobs of a deleted job failed; `bitalloc gc` will find them")


@dataclass(frozen=True)
class Swept:
    """What a sweep removed (or would remove): blobs by sha256 and temporary files, with their bytes."""

    blobs: dict[str, int]
    temporaries: dict[Path, int]

    @property
    def bytes(self) -> int:
        return sum(self.blobs.values()) + sum(self.temporaries.values())


def sweep(sessions: sessionmaker[Session], store: BlobStore, *, min_age: float, dry_run: bool = False) -> Swept:
    """Remove orphans: blobs no row names (a crash after a delete, or versions that never removed
    any) and temporary files of interrupted writes, untouched for ``min_age`` seconds (a younger
    file may belong to a write whose row has not committed yet)."""
    cutoff = time.time() - min_age
    blobs = remove_unreferenced(sessions, store, list(store.blobs()), older_than=cutoff, dry_run=dry_run)
    temporaries: dict[Path, int] = {}
    for path in store.temporaries():
        stat = _stat(path)
        if stat is not None and stat.st_mtime < cutoff:
            if not dry_run:
                path.unlink(missing_ok=True)
            temporaries[path] = stat.st_size
    return Swept(blobs, temporaries)


def _stat(path: Path) -> os.stat_result | None:
    """The file's own status (a link is not followed), or None when it is gone."""
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
