"""Plugins: modules named by the ``bitalloc.models`` entry points, imported once before the
first model or data source is resolved. Each registers what it provides with
``quant.loading`` (factories, architectures, model schemes) and ``quant.calibration`` (text and
tensor sources), so neither imports the plugins. The reference zoo is one (``pyproject.toml``);
a user's package adds its own model or data sources the same way.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

GROUP = "bitalloc.models"


@functools.cache
def load_plugins() -> None:
    for plugin in entry_points(group=GROUP):
        plugin.load()
