"""``bitalloc build / generate``: a model quantized as an allocation, for a runtime, and text from bitalloc's own."""

from __future__ import annotations

from pathlib import Path

import typer

from bitalloc.service.cli.common import DEVICE_HELP, DTYPE_HELP, fail, read_allocation


def build(
    model: str = typer.Option(..., help="Model spec: a local directory, a .gguf file, a hub id, zoo:NAME or factory:NAME."),
    allocation: Path = typer.Option(..., help="alloc.json from `bitalloc solve` or `bitalloc run` (or a {unit: format} map)."),
    out: Path = typer.Option(..., help="Folder to write (for the bitalloc target: weights.safetensors, bitalloc_artifact.json, "
                                       "config, tokenizer)."),
    target: str = typer.Option("bitalloc", help="What to write: bitalloc (the packed artifact for bitalloc's kernels), "
                                                "gguf (a GGUF made by llama.cpp's llama-quantize; `bitalloc llamacpp "
                                                "build` first) or compressed-tensors (a checkpoint that vLLM loads)."),
    method: str = typer.Option("rtn", help="Quantizer: rtn or gptq (GPTQ fits integer units on "
                               "--calibration; ggml types get llama.cpp's importance matrix of it)."),
    calibration: str | None = typer.Option(None, help="GPTQ calibration source (default: the reference calibration split)."),
    samples: int = typer.Option(32, help="GPTQ calibration windows (or input samples)."),
    seq_len: int = typer.Option(512, help="Tokens per calibration window."),
    overwrite: bool = typer.Option(False, help="Replace an existing artifact folder."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Quantize a model as an allocation and write it for a runtime (by default bitalloc's verifiable artifact)."""
    from bitalloc.quant.artifact import ArtifactError
    from bitalloc.quant.calibration import calibration_for
    from bitalloc.quant.device import resolve_device
    from bitalloc.quant.loading import ModelLoadError, load_model, model_dtype
    from bitalloc.quant.targets import TARGETS, BuildRequest, build_target
    from bitalloc.service.progress import progress_bar
    from bitalloc.service.settings import get_settings

    if target not in TARGETS:
        raise fail(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    try:
        formats = read_allocation(allocation)
        where = resolve_device(device)
        loaded = load_model(model, get_settings().load_policy(), model_dtype(dtype, where), where)
        data_set = calibration_for(loaded, calibration, seq_len=seq_len, count=samples) if method == "gptq" else None
        with progress_bar() as progress:
            built = build_target(target, BuildRequest(loaded, formats, out, method=method,  # type: ignore[arg-type]
                                                      calibration=data_set, overwrite=overwrite, progress=progress))
    except (ModelLoadError, ArtifactError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    on_disk = sum(p.stat().st_size for p in built.path.rglob("*") if p.is_file())
    typer.echo(f"{target}: {on_disk / 2**20:.2f} MiB on disk -> {built.path}")


def generate(
    artifact: Path = typer.Option(..., help="An artifact folder written by `bitalloc build`."),
    prompt: str = typer.Option(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate (greedy)."),
    device: str = typer.Option("cpu", help="cpu, or cuda to run the quantized layers on the Triton kernels."),
) -> None:
    """Load an artifact (every tensor checked against its manifest) and continue a prompt greedily."""
    import torch

    from bitalloc.quant.artifact import ArtifactError, load_artifact

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise fail(f"--device {device}: no CUDA device is available here")
    try:
        loaded = load_artifact(artifact)
    except ArtifactError as exc:
        raise fail(str(exc)) from exc
    if loaded.tokenizer is None:
        raise fail(f"{artifact} is not a language model (it has no tokenizer), so it cannot generate text")
    module = loaded.module.to(device)
    inputs = loaded.tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        output = module.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    typer.echo(prompt + loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def register(app: typer.Typer) -> None:
    app.command("build")(build)
    app.command("generate")(generate)
