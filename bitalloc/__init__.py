"""bitalloc: mixed-precision bit-allocation search.

One importable name for the whole project, so that nothing of ours lands at the top level of
site-packages where generic names (``kernels``, ``search``, ``service``) collide with other
distributions. The layers, from the bottom up:

- ``bitalloc.kernels``: bit-plane packing, the Triton dequant GEMV/GEMM and their torch reference;
- ``bitalloc.search``: problems, allocations, fronts and the solvers (no torch);
- ``bitalloc.quant``: everything about a model (loading, formats, metrics, evaluation, exports);
- ``bitalloc.service``: the job pipeline, CLI, REST API, workers and dashboard;
- ``bitalloc.migrations``: the database schema's Alembic history.
"""
