"""surrogate: the measured interaction surrogate, one file per part.

``sampler`` draws allocations near the budget, ``layout`` says which units may interact,
``model`` fits a model of measured KL with pairwise terms, ``exact`` minimises it under the
budgets and tie groups, and ``solver`` is the loop that measures, fits, solves and confirms.
"""

from bitalloc.search.solvers.surrogate.solver import SurrogateSolver

__all__ = ["SurrogateSolver"]
