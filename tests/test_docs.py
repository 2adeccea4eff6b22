"""The design doc names only what exists: every path and module it cites is in the tree."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "architecture.md"


def cited(pattern: str) -> set[str]:
    return set(re.findall(pattern, ARCHITECTURE.read_text()))


def test_every_path_the_architecture_names_exists():
    paths = cited(r"`(bitalloc/[\w/.]+?)/?`") | cited(r"\((bitalloc/[\w/.]+\.py)")
    assert len(paths) > 30
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def resolves(name: str) -> bool:
    """A module, or an attribute of one (``bitalloc.kernels.QuantLinear``)."""
    if importlib.util.find_spec(name) is not None:
        return True
    parent, _, attribute = name.rpartition(".")
    return importlib.util.find_spec(parent) is not None and hasattr(importlib.import_module(parent), attribute)


def test_every_module_the_architecture_names_resolves():
    names = {m.rstrip(".") for m in cited(r"`(bitalloc(?:\.\w+)+)")}
    assert "bitalloc.pipeline.run_job" in names
    missing = sorted(name for name in names if not resolves(name))
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_the_readme_links_the_architecture():
    assert "(docs/architecture.md)" in (REPO / "README.md").read_text()
