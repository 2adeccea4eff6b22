"""llama.cpp: a shell script running ``llama-quantize`` with one ``--tensor-type`` per allocated tensor.

Each unit becomes its GGUF tensor (``quant.gguf_names``) and its format the nearest ggml type
by bits per weight that keeps at least the format's code width (table in docs/exports.md):
integer widths 2/3/4/5/6/8 -> Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/Q8_0, ``nf4`` -> IQ4_XS (a 4-bit
non-linear codebook), ``fp4_e2m1`` -> MXFP4 (the same E2M1 values in blocks of 32),
``fp8_e4m3`` -> Q8_0, ``fp6_e3m2`` -> Q6_K, 16-bit -> F16/BF16. llama.cpp's own types
(``q4_k``, ``iq4_xs``: ``quant.formats.GgmlFormat``) are written as themselves, with the type
the format itself says llama-quantize writes for the tensor (its fallback, or F16).

K-quants and IQ4_XS pack rows in super-blocks of 256, so a tensor whose row length (K) is not
a multiple of 256 cannot hold them. llama.cpp then silently falls back (``tensor_type_fallback``
in src/llama-quant.cpp: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
IQ4_XS -> IQ4_NL); this export applies the same fallback itself and writes the resulting
type, commented, so the script states what the GGUF will hold. A row that is not a multiple
of 32 fits no quantized type (llama.cpp would keep it F16) and is refused.

The script runs ``--pure`` (no k-quant mixture rules for anything not named), keeps the token
embeddings and output at F16 unless the allocation names them (bitalloc counts them as
16-bit), and passes a quantized base type, without which llama-quantize ignores every
``--tensor-type``. KV units are runtime settings in llama.cpp (``--cache-type-k/-v`` of
llama-cli/llama-server), one type for all layers' keys and one for values: the script prints
them when each is uniform and has a cache type of the same width, and the export is refused
otherwise.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from bitalloc import ggml
from bitalloc.quant.export.base import (
    Exporter,
    ExportError,
    ExportRequest,
    Problems,
    format_family,
)
from bitalloc.quant.formats import Format, GgmlFormat
from bitalloc.quant.gguf_names import gguf_tensor, tensor_type_pattern

TARGET = "llama.cpp"
# bitalloc format family (asymmetry aside) -> the nearest ggml type holding at least its code width.
PRIMARY = {
    "int2": T.Q2_K, "int3": T.Q3_K, "int4": T.Q4_K, "int5": T.Q5_K, "int6": T.Q6_K, "int8": T.Q8_0,
    "nf4": T.IQ4_XS, "fp4_e2m1": T.MXFP4, "fp6_e3m2": T.Q6_K, "fp8_e4m3": T.Q8_0, "bf16": T.BF16, "fp16": T.F16,
}
# The llama-quantize type argument whose default tensor type is each ggml type (the base of the run).
FTYPE = {T.Q2_K: "Q2_K", T.Q3_K: "Q3_K_M", T.Q4_K: "Q4_K_M", T.Q5_K: "Q5_K_M", T.Q6_K: "Q6_K", T.Q8_0: "Q8_0",
         T.Q4_0: "Q4_0", T.Q4_1: "Q4_1", T.Q5_0: "Q5_0", T.Q5_1: "Q5_1", T.IQ4_XS: "IQ4_XS", T.IQ4_NL: "IQ4_NL",
         T.IQ3_S: "IQ3_S", T.MXFP4: "MXFP4_MOE"}
# KV cache types llama.cpp accepts (--cache-type-k/-v), by bitalloc format family.
CACHE_TYPES = {"int4": T.Q4_0, "int4_asym": T.Q4_1, "int5": T.Q5_0, "int5_asym": T.Q5_1, "int8": T.Q8_0,
               "int8_asym": T.Q8_0, "bf16": T.BF16, "fp16": T.F16}


def ggml_name(qtype: T) -> str:
    """The spelling ``ggml_type_name`` gives (``q4_K``, ``iq4_nl``, ``bf16``); llama-quantize ignores case."""
    return qtype.name.lower().replace("_k", "_K")


@dataclass(frozen=True)
class TensorType:
    """The ggml type a unit gets, and the k-quant it fell back from (when its row was too short)."""

    qtype: T
    fallback_from: T | None = None


def ggml_type_for(fmt: Format, k: int) -> TensorType | str:
    """The ggml type for ``fmt`` on rows of ``k`` elements, or why there is none."""
    if isinstance(fmt, GgmlFormat):
        stored = T[fmt.ggml_type_for((1, k))]
        return TensorType(stored, None if stored.name == fmt.ggml_type else T[fmt.ggml_type])
    family = format_family(fmt).removesuffix("_asym")
    primary = PRIMARY[family]
    if ggml.fits(primary.name, k):
        return TensorType(primary)
    fallback = T[ggml.FALLBACK[primary.name]] if primary.name in ggml.FALLBACK else None
    if fallback is not None and ggml.fits(fallback.name, k):
        return TensorType(fallback, primary)
    return (f"{fmt.name}: K is not a multiple of {ggml.block((fallback or primary).name)[0]}, so no quantized ggml "
            f"type fits its rows (llama.cpp would keep it F16)")


def cache_types(request: ExportRequest, problems: Problems) -> dict[str, T]:
    """``--cache-type-k`` / ``--cache-type-v`` when each cache is uniform and has a type; problems otherwise."""
    chosen: dict[str, T] = {}
    for kind, flag in (("kv_key", "k"), ("kv_value", "v")):
        units = [u for u in request.kv_units if u.kind == kind]
        names = sorted({request.format_of(u).name for u in units})
        if len(names) > 1:
            reason = (f"{'keys' if flag == 'k' else 'values'} in {', '.join(names)}: llama.cpp sets one "
                      f"--cache-type-{flag} for every layer")
        elif names:
            fmt = request.format_of(units[0])
            qtype = CACHE_TYPES.get(format_family(fmt))
            if qtype is not None:
                chosen[flag] = qtype
                continue
            reason = (f"{fmt.name} KV cache: llama.cpp's cache types are f16, bf16, q8_0, q5_0/q5_1 and "
                      f"q4_0/q4_1, none {fmt.bits}-bit")
        else:
            continue
        for unit in units:
            problems.add(reason, unit.name)
    return chosen


@dataclass(frozen=True)
class Line:
    """One tensor's setting in the script: the GGUF tensor (``blk.3.attn_q``), its llama-quantize
    arguments, a comment, the type it gets and that type's bytes."""

    tensor: str
    args: tuple[str, ...]
    comment: str
    qtype: T
    nbytes: int


def tensor_lines(request: ExportRequest, problems: Problems) -> list[Line]:
    lines = []
    for unit in request.weights:
        fmt = request.format_of(unit)
        tensor = gguf_tensor(unit.name)
        if tensor is None:
            problems.add("no GGUF tensor name is known for this module (quant/gguf_names.py)", unit.name)
            continue
        n, k = unit.shape
        chosen = ggml_type_for(fmt, k)
        if isinstance(chosen, str):
            problems.add(chosen, f"{unit.name} (K={k})")
            continue
        name = ggml_name(chosen.qtype)
        if tensor.kind == "token_embd":
            args: tuple[str, ...] = ("--token-embedding-type", name)
        elif tensor.kind == "output":
            args = ("--output-tensor-type", name)
        else:
            args = ("--tensor-type", f"{tensor_type_pattern(tensor.name)}={name}")
        note = f"{unit.name}: {fmt.name}"
        if chosen.fallback_from is not None:
            needed = ggml.block(chosen.fallback_from.name)[0]
            note += f", {ggml_name(chosen.fallback_from)} falls back (K={k} is not a multiple of {needed})"
        block, size = ggml.block(chosen.qtype.name)
        lines.append(Line(tensor.name, args, note, chosen.qtype, n * k // block * size))
    return lines


def build(request: ExportRequest) -> bytes:
    problems = Problems(TARGET)
    lines = tensor_lines(request, problems)
    caches = cache_types(request, problems)
    problems.raise_if_any()
    if all(line.qtype in (T.F16, T.BF16) for line in lines):
        raise ExportError(f"{TARGET}: every unit is 16-bit, so there is nothing for llama-quantize to do "
                          f"(convert_hf_to_gguf.py --outtype f16 writes that model)")
    base = _base_type(lines)
    kinds = {line.args[0] for line in lines}
    defaults = [(flag, "f16") for flag in ("--token-embedding-type", "--output-tensor-type") if flag not in kinds]
    return _script(request, lines, defaults, base, caches).encode()


def _base_type(lines: list[Line]) -> str:
    """The llama-quantize type whose default is the quantized ggml type covering the most GGUF bytes.

    Every allocated tensor is named explicitly, so the base only has to be quantized (llama-quantize
    applies ``--tensor-type`` only then) and decides nothing else under ``--pure``.
    """
    covered: dict[T, int] = {}
    for line in lines:
        if line.qtype in FTYPE:
            covered[line.qtype] = covered.get(line.qtype, 0) + line.nbytes
    return FTYPE[max(sorted(covered), key=covered.__getitem__)]


def _comment(text: str) -> str:
    """One script line whatever the text holds (a model path with a newline must not start a command)."""
    return " ".join(text.splitlines())


def _script(request: ExportRequest, lines: list[Line], defaults: list[tuple[str, str]], base: str,
            caches: Mapping[str, T]) -> str:
    provenance = request.provenance
    gguf_bytes = sum(line.nbytes for line in lines)
    allocation_bytes = sum(request.format_of(u).nbytes(u.shape) for u in request.weights)
    out = [
        "#!/bin/sh",
        "# bitalloc export for llama.cpp: llama-quantize with one --tensor-type per allocated tensor.",
        _comment(f"# model: {provenance.get('model', '?')}"
                 + "".join(f", {key}: {provenance[key]}" for key in ("job_id", "point_id") if key in provenance)),
        f"# {len(lines)} tensors; GGUF bytes of these tensors {gguf_bytes} "
        f"(the allocation's {allocation_bytes}; k-quant block scales and fallbacks differ from bitalloc's layout).",
        "# Usage: sh THIS_FILE MODEL-F16.gguf OUT.gguf [THREADS]",
        "#   (with LLAMA_IMATRIX=FILE.gguf set, llama-quantize also gets --imatrix FILE.gguf)",
        "#   (MODEL-F16.gguf from: python convert_hf_to_gguf.py MODEL_DIR --outtype f16 --outfile MODEL-F16.gguf)",
    ]
    if caches:
        flags = " ".join(f"--cache-type-{flag} {ggml_name(qtype)}" for flag, qtype in sorted(caches.items()))
        needs_fa = caches.get("v", T.F16) not in (T.F16, T.BF16)
        out.append(f"# Run it with (llama-cli / llama-server): {flags}" + (" --flash-attn on" if needs_fa else ""))
    out += ["set -eu", 'in=$1 out=$2 threads=${3:-}', "set -- --pure"]
    for flag, value in defaults:
        out.append(f"set -- \"$@\" {flag} {value}  # not allocated by bitalloc: kept 16-bit")
    for line in lines:
        out.append(f"set -- \"$@\" {shlex.join(line.args)}  # {line.comment}")
    out.append('if [ -n "${LLAMA_IMATRIX:-}" ]; then set -- "$@" --imatrix "$LLAMA_IMATRIX"; fi')
    out.append(f'exec "${{LLAMA_QUANTIZE:-llama-quantize}}" "$@" "$in" "$out" {base} ${{threads:+"$threads"}}')
    return "\n".join(out) + "\n"


EXPORTER = Exporter(
    name="llama.cpp", filename="llama-quantize.sh", media_type="text/x-shellscript",
    description="a shell script running llama-quantize with a --tensor-type per GGUF tensor (nearest ggml types), "
                "plus the KV --cache-type flags.",
    build=build,
)
