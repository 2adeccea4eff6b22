"""The job pipeline: from a job spec to a front, the chosen point and its evaluation.

It sits between ``service`` (HTTP, database, queue, workers, CLI) and the libraries it joins,
``quant`` (models) and ``search`` (solvers): the one place that knows both.

* ``spec``: ``JobSpec``, the budgets a job may bound and their validation;
* ``problem``: ``problem_of``, a profile as the search problem it poses;
* ``steps``: the ``Step`` s that choose the point (``Solve``, ``Baseline``, ``Target``, then
  ``Descend`` and ``Refine``), composed by ``recipe(spec)``;
* ``baselines``: the allocations a job is compared against, on the same profile;
* ``run``: ``run_job``, the whole job.
"""

from bitalloc.lazy import lazy_exports
from bitalloc.pipeline.spec import JobSpec

# Imported on first use: the models' and solvers' libraries take seconds, which building and
# checking a spec (the CLI refusing a bad argument) should not pay.
_LAZY = {"JobResult": "bitalloc.pipeline.run", "evaluate_point": "bitalloc.pipeline.run",
         "run_job": "bitalloc.pipeline.run", "problem_of": "bitalloc.pipeline.problem"}

__all__ = ["JobResult", "JobSpec", "evaluate_point", "problem_of", "run_job"]

__getattr__ = lazy_exports(__name__, globals(), _LAZY)
