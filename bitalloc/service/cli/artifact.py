"""``bitalloc build / generate``: the packed quantized artifact of an allocation, and text from it."""

from __future__ import annotations

from pathlib import Path

import typer

from bitalloc.service.cli.common import fail, read_allocation


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
    from bitalloc.quant.artifact import ArtifactError, build_artifact
    from bitalloc.quant.calibration import calibration_for
    from bitalloc.quant.loading import ModelLoadError, load_model
    from bitalloc.service.progress import progress_bar
    from bitalloc.service.settings import get_settings

    try:
        formats = read_allocation(allocation)
        loaded = load_model(model, get_settings().load_policy())
        data_set = calibration_for(loaded, calibration, seq_len=seq_len, count=samples) if method == "gptq" else None
        with progress_bar() as progress:
            artifact = build_artifact(loaded, formats, out, method=method, calibration=data_set,  # type: ignore[arg-type]
                                      overwrite=overwrite, progress=progress)
    except (ModelLoadError, ArtifactError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"{len(artifact.manifest['units'])} units, {artifact.disk_bytes / 2**20:.2f} MiB on disk "
               f"(predicted tensor bytes: {artifact.predicted_bytes / 2**20:.2f} MiB) -> {out}")


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
