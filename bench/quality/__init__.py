"""Search quality on the reference LM: bitalloc's allocations against the ones users would
otherwise pick, all scored on the held-out evaluation split.

For each quantizer (RTN, GPTQ) it profiles SmolLM2-135M once per metric (cached), builds
every baseline of ``search.baselines`` (uniform, two-width mixes by whole layers,
llama.cpp's per-tensor mixes in both modes, HAWQ-V3's trace ILP with and without tie
groups, NNCF's ratio rule) and bitalloc's own methods (each metric with the exact solver,
NSGA-II, measured descent and refinement; the headline ``fisher_mse`` + ``dp`` tied and
untied), at the target average bits and at every baseline's own bits, and scores each
allocation with ``quant.evaluate``: KL from the 16-bit model, perplexity, top-1 agreement,
bits and bytes, and the method's wall time. Then:

- the goal check, per runtime: for every baseline point in the useful band (its KL between
  ``--band``), the best bitalloc allocation of at most its bits that runs where it runs
  (tied only, for runtimes that fuse q/k/v and gate/up; anything, for runtimes that store
  tensors apart), and whether its KL is at least 30 % lower;
- the KV cache in the same memory budget at two context lengths (``--kv-contexts``);
- accuracy-target mode: bisection over the front by the 95 % upper bound of KL measured
  window by window on the tuning text, checked on the evaluation split.

Measured search (descent, refinement, the accuracy target) runs the pipeline's own steps on a
job's ``Workspace``, scoring on the job's default fitness text (``zoo:tuning``: speeches and a
novel, like the evaluation split, never it). Profiles come from ``quant.profile.ProfileCache``.

Prints tables, writes ``bench/results/quality.json`` and draws ``bench/results/quality.png``
(KL against average bits, one line per method). ``--quick`` runs a small smoke version.
Every scored point is checkpointed: ``--resume`` reuses them (or, without a checkpoint, the
points of the result file), ``--rescore FAMILIES`` measures those families again and prints how
far they moved, ``--append`` adds this run's points and parts to an existing result
(``resumed_points`` in the JSON counts the reused ones).

Modules: ``harness`` (the model, profiles, workspaces and scoring), ``experiments`` (what is
scored), ``report`` (the goal check, tables and plot), ``__main__`` (the run).

    python -m bench.quality [--threads 2] [--quantizers rtn,gptq] [--eval-windows 16] [--quick]
"""
