"""The solvers; importing this package registers them by name."""

from bitalloc.search.solvers import descent, dp, greedy, ilp, nsga2, optuna_study, refine, surrogate  # noqa: F401  (registration)
