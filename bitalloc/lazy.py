"""Names a package exports but imports only on first use (PEP 562), for the packages whose
parts are slow to import (torch's siblings, the solvers' libraries) or must wait for the process
to configure them (Triton reads ``TRITON_INTERPRET`` when a kernel is defined)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any], homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``name`` from ``homes[name]`` on first use and keeps it
    in the package's ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(homes[name]), name)
        namespace[name] = value
        return value

    return __getattr__
