"""One policy for every path a job reads: its model, calibration, evaluation and fitness sources.

``check_inputs`` holds a job spec to the operator's ``LoadPolicy`` before anything is read:
a local file must lie inside the model roots (when they are set), and a ``datasets:`` source
must name a hub dataset, never a folder or file builder on this machine. The API calls it at
submit (a 422 naming the field) and ``run_job`` and the artifact build call it again in the
worker, so a job stored before a policy changed is held to the policy it runs under.
llama.cpp's types among the formats need this machine's built llama.cpp tools: a job is
refused up front when they are not built, not after its model has loaded.
"""

from __future__ import annotations

from bitalloc.pipeline.spec import JobSpec
from bitalloc.quant.calibration import check_source
from bitalloc.quant.formats import GgmlFormat, parse_formats
from bitalloc.quant.llamacpp.tools import ToolsNotBuilt, tools
from bitalloc.quant.loading import LoadPolicy, check_model_spec


class InputError(ValueError):
    """An input the policy refuses; ``field`` names it as the REST body does (``calibration.source``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_inputs(spec: JobSpec, policy: LoadPolicy) -> None:
    try:
        check_model_spec(spec.model, policy)
    except ValueError as exc:
        raise InputError("model", str(exc)) from exc
    for field, source in (("calibration.source", spec.calibration), ("evaluation.source", spec.evaluation)):
        if source is None:
            continue
        try:
            check_source(source, policy)
        except ValueError as exc:
            raise InputError(field, str(exc)) from exc
    ggml_types = [f.name for f in parse_formats(spec.formats) if isinstance(f, GgmlFormat)]
    if ggml_types:
        try:
            tools()
        except ToolsNotBuilt as exc:
            raise InputError("formats", f"{', '.join(ggml_types)}: {exc}") from exc
