"""bitalloc against llama.cpp's own mixes, measured by llama.cpp itself.

For one model (``--model``: any spec ``bitalloc run`` takes), with the tools that
``bitalloc llamacpp build`` makes:

1. ``convert_hf_to_gguf.py`` writes the 16-bit GGUF; ``llama-perplexity --kl-divergence-base``
   records its logits on the evaluation text (``--evaluation``), and every quantized file's KL
   is measured against them (``llama-perplexity --kl-divergence``: mean KLD over the scored
   tokens, with its standard error);
2. llama.cpp's mixes (``--mixes``: Q3_K_M ... Q6_K by default) are made by ``llama-quantize``,
   without and with an importance matrix that ``llama-imatrix`` computes on the calibration text;
3. bitalloc profiles the model over ggml's own types (``--formats``), and solves, for each mix,
   the allocation whose quantized tensors take no more bytes than the mix's quantized block
   tensors; ``llama-quantize`` applies it (the llama.cpp export's ``--tensor-type`` rules),
   with the token embeddings and output in the mix's own types, so both files hold the same
   other tensors and compare at the same file size;
4. for each imatrix mix, bitalloc with an importance matrix too: the profile with method
   ``gptq`` (ggml's rounding weighted by the calibration's mean squared activations, llama.cpp's
   imatrix), solved at the imatrix mix's bytes, and quantized by ``llama-quantize --imatrix``
   of bitalloc's own importance matrix, written from the same calibration windows as the
   profile, so the file holds the blocks bitalloc simulated.

The default candidates leave out ``q4_1``: a model whose weights were dequantized from a Q4_1
GGUF (the reference SmolLM2 was) is reproduced almost exactly by llama.cpp's ``q4_1``, which
says nothing about allocation. Add it back (``--formats``) for a model that never was Q4_1.

Prints a table, writes ``bench/results/llamacpp.json`` and a plot.

    python -m bench.llamacpp [--model zoo:llm] [--mixes Q4_K_M,Q5_K_M] [--chunks 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFReader

from bitalloc.pipeline import JobSpec, run_job
from bitalloc.quant.calibration import calibration_for, load_texts
from bitalloc.quant.export import llama_cpp
from bitalloc.quant.export.base import Problems, make_request
from bitalloc.quant.gguf_names import gguf_tensor
from bitalloc.quant.hessian import calibration_hessians
from bitalloc.quant.llamacpp.imatrix import write_imatrix
from bitalloc.quant.llamacpp.tools import Tools, tools
from bitalloc.quant.loading import LoadedModel, load_model
from bitalloc.quant.targets.gguf_file import convert_to_gguf
from bitalloc.quant.units import enumerate_units, weight_units
from bitalloc.search import Budgets

RESULTS = Path(__file__).resolve().parent / "results"
MIXES = "Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_S,Q5_K_M,Q6_K"
FORMATS = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0,q4_0,q5_0,q5_1,iq4_xs,iq4_nl"
KLD = re.compile(r"Mean\s+KLD:\s+([0-9.eE+-]+)\s+±\s+([0-9.eE+-]+)")
THREADS = str(len(os.sched_getaffinity(0)))


def run(command: list[str], step: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{step} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr


def text_file(source: str, path: Path) -> Path:
    path.write_text("\n\n".join(load_texts(source)))
    return path


def kl_of(built: Tools, model: Path, base: Path) -> tuple[float, float]:
    """Mean KL (nats per token) of ``model``'s next-token distribution from the 16-bit model's, and its error."""
    out = run([str(built.perplexity), "-m", str(model), "--kl-divergence-base", str(base), "--kl-divergence",
               "-t", THREADS], f"llama-perplexity on {model.name}")
    found = KLD.search(out)
    if found is None:
        sys.exit(f"llama-perplexity printed no mean KLD for {model.name}:\n{out[-2000:]}")
    return float(found[1]), float(found[2])


def tensor_bytes(path: Path) -> dict[str, tuple[str, int]]:
    """Every tensor of a GGUF: (ggml type, bytes)."""
    return {t.name: (GGMLQuantizationType(t.tensor_type).name, int(t.n_bytes)) for t in GGUFReader(path).tensors}


def unit_tensors(units: list[str]) -> dict[str, str]:
    """bitalloc unit -> its GGUF tensor name (``blk.3.attn_q.weight``)."""
    return {name: f"{gguf_tensor(name).name}.weight" for name in units}


def bitalloc_imatrix(model: LoadedModel, spec: JobSpec, names: dict[str, str], base: Path, path: Path) -> Path:
    """bitalloc's importance matrix of the units ``names`` maps to GGUF tensors, from the calibration
    windows a ``spec`` job profiles on (the Hessians its ``gptq`` cells were weighted by)."""
    calibration = calibration_for(model, spec.calibration, seq_len=spec.seq_len, count=spec.samples, seed=spec.seed,
                                  bos=spec.bos)
    units = enumerate_units(model.module, include=sorted(names), exclude=(), example_inputs=model.example_inputs)
    hessians = calibration_hessians(model.module, units, calibration)
    arch = GGUFReader(base).fields["general.architecture"].contents()
    diagonals = {name: torch.diagonal(h) for name, h in hessians.items()}
    write_imatrix(path, diagonals, hessians.tokens, names, arch=arch, dataset=calibration.source,
                  chunks=spec.samples, chunk_size=spec.seq_len)
    return path


def quantize_allocation(built: Tools, base: Path, out: Path, allocation: dict[str, str], units, mix: dict,
                        imatrix: Path | None = None) -> None:
    """llama-quantize with the export's per-tensor rules; embeddings and output as in the mix's file."""
    request = make_request(allocation, units, (), {}, None)
    problems = Problems(llama_cpp.TARGET)
    lines = llama_cpp.tensor_lines(request, problems)
    problems.raise_if_any()
    args = ["--pure", *(["--imatrix", str(imatrix)] if imatrix else [])]
    for flag, tensor in (("--token-embedding-type", "token_embd.weight"), ("--output-tensor-type", "output.weight")):
        if tensor in mix:
            args += [flag, llama_cpp.ggml_name(GGMLQuantizationType[mix[tensor][0]])]
    for line in lines:
        args += list(line.args)
    run([str(built.quantize), *args, str(base), str(out), "Q8_0", THREADS], f"llama-quantize {out.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:llm")
    parser.add_argument("--calibration", default="zoo:calibration", help="text for the imatrix and bitalloc's profile")
    parser.add_argument("--evaluation", default="zoo:evaluation", help="held-out text llama-perplexity scores")
    parser.add_argument("--mixes", default=MIXES)
    parser.add_argument("--formats", default=FORMATS, help="bitalloc's candidates: ggml types")
    parser.add_argument("--metric", default="fisher_mse")
    parser.add_argument("--ctx", type=int, default=512, help="llama-perplexity / llama-imatrix context")
    parser.add_argument("--chunks", type=int, default=16, help="evaluation chunks of --ctx tokens")
    parser.add_argument("--imatrix-chunks", type=int, default=32)
    parser.add_argument("--no-imatrix", action="store_true", help="skip the imatrix mixes")
    parser.add_argument("--work", type=Path, default=None, help="folder for the GGUFs (default: a temporary one)")
    parser.add_argument("--profile-dir", type=Path, default=Path.home() / ".cache" / "bitalloc" / "bench" / "llamacpp")
    parser.add_argument("--out", type=Path, default=RESULTS / "llamacpp.json")
    args = parser.parse_args()
    built = tools()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = load_model(args.model)
        base = work / "f16.gguf"
        if not base.exists():
            convert_to_gguf(built, model, work, base)
        logits = work / "f16.kld"
        evaluation = text_file(args.evaluation, work / "evaluation.txt")
        run([str(built.perplexity), "-m", str(base), "-f", str(evaluation), "-c", str(args.ctx), "--chunks",
             str(args.chunks), "--kl-divergence-base", str(logits), "-t", THREADS], "llama-perplexity (16-bit)")
        imatrix = None
        if not args.no_imatrix:
            imatrix = work / "imatrix.gguf"
            calibration = text_file(args.calibration, work / "calibration.txt")
            run([str(built.imatrix), "-m", str(base), "-f", str(calibration), "-c", str(args.ctx), "--chunks",
                 str(args.imatrix_chunks), "-o", str(imatrix), "-t", THREADS], "llama-imatrix")
        units = [u for u in weight_units(model.module) if gguf_tensor(u.name) is not None]
        names = unit_tensors([u.name for u in units])
        ours_imatrix = None
        rows = []
        for mix in args.mixes.split(","):
            for with_imatrix in ([False, True] if imatrix is not None else [False]):
                label = f"{mix}{'+imatrix' if with_imatrix else ''}"
                path = work / f"{label}.gguf"
                run([str(built.quantize), *(["--imatrix", str(imatrix)] if with_imatrix else []), str(base), str(path),
                     mix, THREADS], f"llama-quantize {label}")
                mixed = tensor_bytes(path)
                budget = sum(mixed[names[u.name]][1] for u in units)
                kl, error = kl_of(built, path, logits)
                rows.append({"method": label, "kind": "llama.cpp", "imatrix": with_imatrix,
                             "file_bytes": path.stat().st_size, "unit_bytes": budget, "kl": kl, "kl_error": error})
                print(f"{label}: {path.stat().st_size / 2**20:.1f} MiB, KL {kl:.5f}", file=sys.stderr, flush=True)
                spec = JobSpec(model=args.model, formats=args.formats.split(","), metric=args.metric,
                               calibration=args.calibration, budgets=Budgets(max_bytes=budget), evaluation=None,
                               points=2, method="gptq" if with_imatrix else "rtn")
                if with_imatrix and ours_imatrix is None:
                    ours_imatrix = bitalloc_imatrix(model, spec, names, base, work / "bitalloc-imatrix.gguf")
                chosen = run_job(spec, profile_dir=args.profile_dir).chosen
                ours_label = f"bitalloc{'+imatrix' if with_imatrix else ''}@{mix}"
                ours = work / f"{ours_label}.gguf"
                quantize_allocation(built, base, ours, dict(chosen.formats), units, mixed,
                                    ours_imatrix if with_imatrix else None)
                kl_ours, error_ours = kl_of(built, ours, logits)
                stored = tensor_bytes(ours)
                rows.append({"method": ours_label, "kind": "bitalloc", "imatrix": with_imatrix,
                             "file_bytes": ours.stat().st_size, "unit_bytes": sum(stored[names[u.name]][1] for u in units),
                             "predicted_unit_bytes": chosen.bytes, "kl": kl_ours, "kl_error": error_ours,
                             "kl_ratio": kl_ours / kl, "types": sorted({t for t, _ in stored.values()})})
                print(f"{ours_label}: {ours.stat().st_size / 2**20:.1f} MiB, KL {kl_ours:.5f} ({kl_ours / kl:.2f}x)",
                      file=sys.stderr, flush=True)
    report = {"model": args.model, "formats": args.formats.split(","), "metric": args.metric, "ctx": args.ctx,
              "chunks": args.chunks, "llama_cpp": built.manifest()["version"], "seconds": round(time.perf_counter() - started),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'method':<26}{'file MiB':>10}{'unit MiB':>10}{'KL':>10}{'± se':>9}{'ratio':>7}")
    for r in rows:
        ratio = f"{r['kl_ratio']:.2f}" if "kl_ratio" in r else ""
        print(f"{r['method']:<26}{r['file_bytes'] / 2**20:>10.2f}{r['unit_bytes'] / 2**20:>10.2f}{r['kl']:>10.5f}"
              f"{r['kl_error']:>9.5f}{ratio:>7}")
    plot(rows, args.out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for kind, imatrix, marker, label in (("llama.cpp", False, "o", "llama.cpp mixes"),
                                         ("llama.cpp", True, "s", "llama.cpp mixes + imatrix"),
                                         ("bitalloc", False, "^", "bitalloc (ggml types)"),
                                         ("bitalloc", True, "v", "bitalloc (ggml types) + imatrix")):
        chosen = [r for r in rows if r["kind"] == kind and r["imatrix"] == imatrix]
        if chosen:
            axes.plot([r["file_bytes"] / 2**20 for r in chosen], [r["kl"] for r in chosen], marker, label=label)
    axes.set_xlabel("GGUF file size (MiB)")
    axes.set_ylabel("mean KL vs 16-bit (llama-perplexity)")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
