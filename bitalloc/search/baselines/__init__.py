"""Baselines: the allocations a user would get without bitalloc, on bitalloc's own Problem.

Each baseline returns a :class:`search.Allocation` of the given problem, so it is scored by
the same code as bitalloc's own answers; ``solver`` names the baseline and ``info`` says
how it was derived. Sources and what is approximated: ``docs/baselines.md``.

* :func:`uniform`, :func:`uniform_within`: one format everywhere.
* :func:`layer_mix`: two widths by whole blocks, ends first, at most a target average.
* :func:`llamacpp`: llama.cpp's per-tensor k-quant mixes (Q2_K ... Q6_K), with or
  without its row-length fallback, mapped onto the problem's formats.
* :func:`hawq_v3`: the ILP over Hessian-trace sensitivities; :func:`rescore` puts its
  formats on another profile.
* :func:`nncf_ratio`: NNCF's ratio-by-parameters assignment from per-unit scores.

``BASELINES`` maps each name to its function, for callers that name one as a string.
"""

from bitalloc.search.baselines.hawq import hawq_v3, rescore
from bitalloc.search.baselines.info import KINDS, ModelInfo, UnitInfo
from bitalloc.search.baselines.llamacpp import (
    FTYPES,
    GGML_BPW,
    format_table,
    llamacpp,
    rule_type,
    tensor_type,
    use_more_bits,
)
from bitalloc.search.baselines.nncf import nncf_ratio, primary_prefix
from bitalloc.search.baselines.uniform import block_order, layer_mix, uniform, uniform_within

BASELINES = {
    "uniform": uniform,
    "uniform_within": uniform_within,
    "layer_mix": layer_mix,
    "llamacpp": llamacpp,
    "hawq_v3": hawq_v3,
    "nncf": nncf_ratio,
}

__all__ = [
    "BASELINES", "FTYPES", "GGML_BPW", "KINDS", "ModelInfo", "UnitInfo", "block_order", "format_table",
    "hawq_v3", "layer_mix", "llamacpp", "nncf_ratio", "primary_prefix", "rescore", "rule_type",
    "tensor_type", "uniform", "uniform_within", "use_more_bits",
]
