"""A profile as the search problem it poses: the one bridge from ``quant``'s profile to ``search``."""

from __future__ import annotations

from quant.profile import Profile
from search import Problem


def problem_of(profile: Profile) -> Problem:
    """The search problem a profile poses (every cell allowed by the profile, its tie groups)."""
    arrays = profile.arrays()
    return Problem(arrays["error"], arrays["bytes"], arrays["numel"], arrays["unit_names"], arrays["format_names"],
                   latency=arrays["latency"], allowed=arrays["allowed"], tie_groups=arrays["tie_groups"])
