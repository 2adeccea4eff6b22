"""``bitalloc run / profile / solve / front / evaluate``: the job's steps, one at a time or all at once."""

from __future__ import annotations

from pathlib import Path

import typer

from bitalloc.service.cli.common import (
    DEFAULT_FORMATS,
    DEVICE_HELP,
    DTYPE_HELP,
    FORMATS_HELP,
    HARDWARE_HELP,
    MAX_MEMORY_HELP,
    SHARDS_HELP,
    STREAM_HELP,
    budgets,
    fail,
    read_allocation,
    write_json,
)


def run(
    model: str = typer.Option("zoo:llm", help="Model spec: a local directory, a .gguf file, a hub id, zoo:NAME or factory:NAME."),
    formats: str = typer.Option(DEFAULT_FORMATS, help=FORMATS_HELP),
    metric: str = typer.Option("fisher_mse", help="Sensitivity metric (fisher_mse predicts KL; output_mse for "
                                                  "modules whose outputs are not logits)."),
    solver: str = typer.Option("dp", help="Solver: dp, ilp, greedy, nsga2, ..."),
    method: str = typer.Option("rtn", help="Quantizer: rtn, or gptq (GPTQ for integer formats, llama.cpp's "
                               "importance matrix of the calibration set for ggml types)."),
    avg_bits: float | None = typer.Option(None, help="Budget: average bits per weight."),
    max_bytes: int | None = typer.Option(None, help="Budget: total bytes."),
    latency: float | None = typer.Option(None, help="Budget: predicted decode latency in seconds."),
    error: float | None = typer.Option(None, help="Budget: predicted error."),
    measured_kl: float | None = typer.Option(None, help="Accuracy target: the smallest allocation whose KL, measured "
                                                        "window by window on the tuning text (or the --calibration text), is at most this "
                                                        "with 95 % confidence."),
    baseline: str | None = typer.Option(None, help="Pick the point by a published rule instead: uniform:FORMAT, "
                                                   "layers:LOW/HIGH, llama.cpp:FTYPE, llama.cpp-plain:FTYPE, hawq_v3, nncf:LOW/HIGH."),
    descend: int = typer.Option(0, help="At most this many measured descent steps from the chosen point: each solves "
                                        "the KL's local model exactly, kept only if it measures better (0: none)."),
    surrogate: int = typer.Option(0, help="Rounds of the measured interaction surrogate from the chosen point: a "
                                          "model of KL with pairwise terms fitted to measured allocations, solved "
                                          "exactly, refitted each round; kept only if it measures better (0: none)."),
    refine: int = typer.Option(0, help="Generations of measured refinement of the chosen point (0: none)."),
    untie: bool = typer.Option(False, help="Let fused units (q/k/v, gate/up) take different formats: for runtimes "
                                           "that store them apart (llama.cpp), not for vLLM."),
    kv_context: int | None = typer.Option(None, help="Include the KV caches as units, costed at this context length."),
    kv_batch: int = typer.Option(1, help="Sequences the KV cache holds."),
    hardware: str = typer.Option("h100", help=HARDWARE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    max_memory: str | None = typer.Option(None, help=MAX_MEMORY_HELP),
    stream: bool = typer.Option(False, "--stream", help=STREAM_HELP),
    shards: int = typer.Option(1, help=SHARDS_HELP),
    points: int = typer.Option(32, help="Points on the front sweep."),
    calibration: str | None = typer.Option(None, help="Calibration source (default: the reference calibration split)."),
    samples: int = typer.Option(32, help="Calibration windows (or input samples)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration/evaluation window."),
    bos: bool | None = typer.Option(None, "--bos/--no-bos", help="Start every window with the BOS token (default: "
                                    "as the model's tokenizer starts a sequence)."),
    eval_windows: int = typer.Option(16, help="Held-out windows to evaluate the chosen point on."),
    out: Path = typer.Option(Path("bitalloc-run"), help="Output folder: profile.npz, front.json, allocation.json, summary.json."),
) -> None:
    """The main job: profile a model, sweep the front, pick the point at the budget, evaluate it."""
    from bitalloc.pipeline.inputs import check_inputs
    from bitalloc.pipeline.spec import JobSpec
    from bitalloc.quant.device import parse_bytes
    from bitalloc.quant.kv import KVOptions
    from bitalloc.quant.loading import ModelLoadError
    from bitalloc.search.errors import InfeasibleBudget
    from bitalloc.service.progress import progress_bar
    from bitalloc.service.settings import get_settings

    settings = get_settings()
    try:
        spec = JobSpec(model=model, formats=formats.split(","), metric=metric, solver=solver,
                       method=method,  # type: ignore[arg-type]
                       budgets=budgets(avg_bits, max_bytes, latency, error), measured_kl=measured_kl, points=points,
                       calibration=calibration, samples=samples, seq_len=seq_len, bos=bos, eval_windows=eval_windows,
                       baseline=baseline, descend=descend, refine=refine, surrogate=surrogate, ties=not untie,
                       kv=None if kv_context is None else KVOptions(kv_context, kv_batch), hardware=hardware,
                       dtype=dtype, device=device, max_memory=None if max_memory is None else parse_bytes(max_memory),
                       stream=stream, shards=shards)
        # The spec refused bad formats, dtype and budgets when it was made; paths are checked too
        # before the seconds of importing the rest.
        check_inputs(spec, settings.load_policy())
        from bitalloc.pipeline.run import run_job

        with progress_bar() as progress:
            result = run_job(spec, profile_dir=settings.profile_dir, policy=settings.load_policy(), progress=progress,
                             notify=lambda message: typer.echo(f"note: {message}", err=True))
    except (ModelLoadError, InfeasibleBudget, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    result.profile.save(out / "profile.npz")
    write_json(out / "front.json", result.front.to_dict())
    if result.chosen is not None:
        write_json(out / "allocation.json", result.chosen.to_dict())
    write_json(out / "summary.json", result.summary())
    _print_run(result, out)


def _print_run(result, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Front ({len(result.front)} points, {result.profile.meta['metric']}, "
                        f"profile {'from cache' if result.profile_cached else 'computed'})")
    for column in ("avg bits", "MiB", "predicted error", "latency us"):
        table.add_column(column, justify="right")
    for allocation in result.front:
        latency = "-" if allocation.latency is None else f"{allocation.latency * 1e6:.0f}"
        table.add_row(f"{allocation.avg_bits:.3f}", f"{allocation.bytes / 2**20:.2f}", f"{allocation.error:.4g}", latency)
    console.print(table)
    if result.chosen is not None:
        chosen = result.chosen
        console.print(f"chosen: {chosen.avg_bits:.3f} avg bits, {chosen.bytes / 2**20:.2f} MiB, predicted error {chosen.error:.4g}")
        counts: dict[str, int] = {}
        for name in chosen.formats.values():
            counts[name] = counts.get(name, 0) + 1
        console.print("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if result.evaluation:
        e = result.evaluation
        console.print(f"held-out: perplexity {e['perplexity']:.3f} (unquantized {e['reference_perplexity']:.3f}), "
                      f"KL {e['kl']:.4f}, top-1 agreement {e['top1']:.3f} on {e['tokens']} tokens")
    compute = result.compute
    console.print(f"computed on {compute['device']} in {compute['dtype']}{', streamed' if compute['streamed'] else ''}; "
                  f"timings: {result.seconds}; written to {out}/")


def profile(
    model: str = typer.Option(..., help="Model spec."),
    metric: str = typer.Option("fisher_mse", help="Sensitivity metric."),
    formats: str = typer.Option(DEFAULT_FORMATS, help=FORMATS_HELP),
    method: str = typer.Option("rtn", help="Quantizer: rtn or gptq (GPTQ's error for integer formats, "
                               "llama.cpp's importance matrix for ggml types)."),
    calibration: str | None = typer.Option(None, help="Calibration source."),
    samples: int = typer.Option(32, help="Calibration windows (or input samples)."),
    seq_len: int = typer.Option(512, help="Tokens per window."),
    kv_context: int | None = typer.Option(None, help="Include the KV caches as units, costed at this context length."),
    kv_batch: int = typer.Option(1, help="Sequences the KV cache holds."),
    hardware: str = typer.Option("h100", help=HARDWARE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    max_memory: str | None = typer.Option(None, help=MAX_MEMORY_HELP),
    stream: bool = typer.Option(False, "--stream", help=STREAM_HELP),
    shards: int = typer.Option(1, help=SHARDS_HELP),
    out: Path = typer.Option(Path("profile.npz"), help="Where to write the profile."),
) -> None:
    """Measure every unit x format cell of a model and write the profile."""
    from bitalloc.quant.calibration import calibration_for
    from bitalloc.quant.device import parse_bytes, resolve_device
    from bitalloc.quant.formats import parse_formats
    from bitalloc.quant.kv import KVOptions
    from bitalloc.quant.loading import ModelLoadError, model_dtype
    from bitalloc.quant.profile import ProfileCache
    from bitalloc.quant.stream import load_within
    from bitalloc.service.progress import progress_bar
    from bitalloc.service.settings import get_settings

    settings = get_settings()
    try:
        candidates = parse_formats(formats)
        where = resolve_device(device)
        loaded = load_within(model, settings.load_policy(), dtype=model_dtype(dtype, where), device=where,
                             max_memory=None if max_memory is None else parse_bytes(max_memory), stream=stream)
        kv = None if kv_context is None else KVOptions(kv_context, kv_batch)
        units = loaded.units(kv_cache=kv is not None)
        data = calibration_for(loaded, calibration, seq_len=seq_len, count=samples)
        with progress_bar() as progress:
            result, cached = ProfileCache(settings.profile_dir).get_or_build(
                loaded, units, candidates, metric, data, method=method, kv=kv, hardware=hardware, progress=progress,
                shards=shards)
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    result.save(out)
    took = "from cache" if cached else f"{result.meta['seconds']} s"
    where = f"{result.meta['device']}, {result.meta['dtype']}{', streamed' if result.meta['streamed'] else ''}"
    typer.echo(f"{len(result.units)} units x {len(result.formats)} formats ({took}; {where}) -> {out}")


def solve(
    profile: Path = typer.Option(..., help="A profile written by `bitalloc profile` or `bitalloc run`."),
    solver: str = typer.Option("dp", help="Solver: dp, ilp, greedy, nsga2, ..."),
    avg_bits: float | None = typer.Option(None, help="Budget: average bits per weight."),
    max_bytes: int | None = typer.Option(None, help="Budget: total bytes."),
    latency: float | None = typer.Option(None, help="Budget: predicted latency in seconds."),
    error: float | None = typer.Option(None, help="Budget: predicted error (minimises bytes when alone)."),
    out: Path = typer.Option(Path("alloc.json"), help="Where to write the allocation."),
) -> None:
    """Solve one budget on a stored profile."""
    from bitalloc.pipeline.problem import problem_of
    from bitalloc.quant.profile import Profile
    from bitalloc.search import InfeasibleBudget
    from bitalloc.search import solve as solve_problem

    given = budgets(avg_bits, max_bytes, latency, error)
    if not given.given():
        raise typer.BadParameter("give at least one budget", param_hint="--avg-bits/--max-bytes/--latency/--error")
    try:
        problem = problem_of(Profile.load(profile))
        allocation = solve_problem(problem, given, solver=solver, objective=given.objective())
    except (InfeasibleBudget, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    write_json(out, allocation.to_dict())
    typer.echo(f"{allocation.avg_bits:.3f} avg bits, {allocation.bytes} bytes, predicted error {allocation.error:.6g} -> {out}")


def front(
    profile: Path = typer.Option(..., help="A stored profile."),
    points: int = typer.Option(64, help="Budgets to sweep between the cheapest and the dearest allocation."),
    solver: str = typer.Option("dp", help="dp, ilp or nsga2."),
    out: Path = typer.Option(Path("front.json"), help="Where to write the front."),
) -> None:
    """Sweep the error/size front of a stored profile."""
    from bitalloc.pipeline.problem import problem_of
    from bitalloc.quant.profile import Profile
    from bitalloc.search import front as sweep

    try:
        result = sweep(problem_of(Profile.load(profile)), ("error", "bytes"), points, solver=solver)
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    write_json(out, result.to_dict())
    typer.echo(f"{len(result)} non-dominated points -> {out}")


def evaluate(
    model: str = typer.Option(..., help="Model spec."),
    allocation: Path = typer.Option(..., help="alloc.json from `bitalloc solve` (or a {unit: format} map)."),
    method: str = typer.Option("rtn", help="rtn or gptq."),
    source: str = typer.Option("zoo:evaluation", help="Held-out text."),
    windows: int = typer.Option(16, help="Windows to score."),
    seq_len: int = typer.Option(512, help="Tokens per window."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Held-out perplexity, KL from the 16-bit model and top-1 agreement of an allocation."""
    import json

    from bitalloc.quant.calibration import calibration_for, evaluation_tokens
    from bitalloc.quant.device import resolve_device
    from bitalloc.quant.evaluate import Evaluator
    from bitalloc.quant.hessian import calibration_hessians
    from bitalloc.quant.loading import ModelLoadError, load_model, model_dtype
    from bitalloc.service.settings import get_settings

    try:
        formats = read_allocation(allocation)
        where = resolve_device(device)
        loaded = load_model(model, get_settings().load_policy(), model_dtype(dtype, where), where)
        units = loaded.units()
        hessians = None
        if method == "gptq":
            calib = calibration_for(loaded, None, seq_len=seq_len)
            hessians = calibration_hessians(loaded.module, units, calib)
        evaluator = Evaluator(loaded, evaluation_tokens(loaded.tokenizer, source, seq_len=seq_len, max_windows=windows))
        result = evaluator.evaluate(formats, method=method, hessians=hessians, units=units)  # type: ignore[arg-type]
    except (ModelLoadError, ValueError, KeyError, FileNotFoundError, json.JSONDecodeError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(json.dumps(result.to_dict(), indent=2))


def register(app: typer.Typer) -> None:
    for name, command in (("run", run), ("profile", profile), ("solve", solve), ("front", front),
                          ("evaluate", evaluate)):
        app.command(name)(command)
