"""A profile as the search problem it poses: the one bridge from ``quant``'s profile to ``search``."""

from __future__ import annotations

from bitalloc.quant.profile import Profile
from bitalloc.search import Problem


def problem_of(profile: Profile, *, ties: bool = True) -> Problem:
    """The search problem a profile poses (every cell allowed by the profile, its tie groups).

    ``ties=False`` lets the units of a tie group (fused q/k/v, gate/up) take different
    formats: right for runtimes that store them apart (llama.cpp), refused by the exports
    for runtimes that fuse them (vLLM).
    """
    arrays = profile.arrays()
    return Problem(arrays["error"], arrays["bytes"], arrays["numel"], arrays["unit_names"], arrays["format_names"],
                   latency=arrays["latency"], allowed=arrays["allowed"],
                   tie_groups=arrays["tie_groups"] if ties else [])
