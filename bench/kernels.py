"""Micro-benchmark of the quantized linear kernels (``kernels.quant_matmul``) on a CUDA GPU.

For every shape [N, K], format (code width, group size, symmetry) and batch it
measures the time per call (CUDA events, warm-up, median of many calls, the
weight buffers rotated past L2 so every call reads HBM), the bytes moved
(packed codes + scales/offsets + x + y), the ideal time at the copy bandwidth
measured in the same run, the efficiency (ideal / measured), and the speed-up
over fp16 ``torch.matmul`` and, for 4-bit, over ``torch._weight_int4pack_mm``
(tinygemm). Each output is also checked against ``kernels.reference``.

It prints a table and merges its entries into
``bitalloc/quant/latency/kernels_<device-slug>.json`` (one file per device, its name
inside), which ``quant.costs`` reads for latency budgets and the package ships. Entries are keyed
by format name as ``quant.formats`` spells it (``int4_g128``, ``int3_pc_asym``,
``fp8_e4m3``; per-channel has ``group_size: null``), plus ``fp16`` rows
(``bits: 16``) for the 16-bit baseline::

    python bench/kernels.py                           # the full sweep
    python bench/kernels.py --bits 4 --batches 1 4    # a subset, merged into the same file
    python bench/kernels.py --smoke                   # tiny shapes, CPU, Triton interpreter

``--smoke`` checks the script's logic without a GPU; its timings are
meaningless and go to a temporary file unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where this file would shadow
# Hugging Face's `kernels` package (which transformers imports); the repository root comes first instead.
REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]
SMOKE_SHAPES = [(64, 256), (40, 160)]
"""The second leaves partial tiles in N and K."""
BITS = [2, 3, 4, 5, 6, 8]
BATCHES = [1, 4, 16, 64]
SMOKE_BATCHES = [1, 3, 16]
GROUP_SIZES = [32, 64, 128, 0]
"""0 stands for per-channel (one group of K)."""
SMOKE_GROUP_SIZES = [32, 0]
TINYGEMM_GROUPS = (32, 64, 128, 256)


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels (and so triton.jit) is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit(
            "bench/kernels.py needs a CUDA device and none was found; "
            "run `python bench/kernels.py --smoke` to check the script on CPU under the Triton interpreter"
        )
    bench = Bench(args)
    bench.run()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--shapes", nargs="+", metavar="NxK", help="weight shapes, outputs x inputs (default: LLM shapes)")
    parser.add_argument("--bits", nargs="+", type=int, default=BITS, choices=BITS)
    parser.add_argument("--group-sizes", nargs="+", type=int, help="0 means per-channel (default: 32 64 128 0)")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--asymmetric", action="store_true", help="also time asymmetric formats (stored offsets)")
    parser.add_argument("--fp8", action="store_true", help="also time fp8_e4m3 weights (compute capability 8.9+)")
    parser.add_argument("--calls", type=int, default=100, help="timed calls per measurement")
    parser.add_argument("--out", type=Path, help="JSON file (default: bitalloc/quant/latency/kernels_<device-slug>.json)")
    args = parser.parse_args()
    if args.shapes:
        args.shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes]
    else:
        args.shapes = SMOKE_SHAPES if args.smoke else SHAPES
    args.batches = args.batches or (SMOKE_BATCHES if args.smoke else BATCHES)
    args.group_sizes = args.group_sizes or (SMOKE_GROUP_SIZES if args.smoke else GROUP_SIZES)
    if args.smoke:
        args.calls = min(args.calls, 3)
    return args


class Bench:
    """One sweep on one device: timing, baselines, table and JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        if self.smoke:
            self.device_name = "cpu (Triton interpreter)"
            self.l2_bytes = 0
            self.fp8_ok = True
        else:
            props = torch.cuda.get_device_properties(self.device)
            self.device_name = props.name
            self.l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
            self.fp8_ok = torch.cuda.get_device_capability(self.device) >= (8, 9)
        self.copy_bytes_per_s = self.copy_bandwidth()
        self.fp16_us: dict[tuple[int, int, int], float] = {}
        self.tiny_us: dict[tuple[int, int, int, int], float | None] = {}
        self.entries: list[dict] = []

    # -- timing -----------------------------------------------------------------

    def time_us(self, call: Callable[[int], object], copies: int) -> float:
        """Median microseconds of ``call(i)`` over ``--calls`` calls, i cycling through the weight copies."""
        for i in range(1 if self.smoke else 3):  # warm-up: compiles and autotunes
            call(i % copies)
        if self.smoke:
            samples = []
            for i in range(self.args.calls):
                start = time.perf_counter()
                call(i % copies)
                samples.append((time.perf_counter() - start) * 1e6)
            return statistics.median(samples)
        return self._time_cuda_us(call, copies)

    def _time_cuda_us(self, call: Callable[[int], object], copies: int, window: int = 25) -> float:
        """CUDA events around each call, with the calls queued behind a sleeping kernel.

        The CPU enqueues a whole window while the GPU sleeps, so each pair of
        events brackets GPU work only, not Python's launch overhead.
        """
        torch = self.torch
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(window):
            call(i % copies)
        torch.cuda.synchronize()
        enqueue_s = (time.perf_counter() - start) / window  # an upper bound: includes the GPU time
        sleep_cycles = int(min(2 * window * enqueue_s * 2e9, 4e9))  # ~2 GHz clocks, at most a couple of seconds
        samples: list[float] = []
        calls = 0
        while calls < self.args.calls:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(window)]
            torch.cuda._sleep(sleep_cycles)
            for begin, end in events:
                begin.record()
                call(calls % copies)
                end.record()
                calls += 1
            torch.cuda.synchronize()
            samples.extend(begin.elapsed_time(end) * 1e3 for begin, end in events)
        return statistics.median(samples)

    def copy_bandwidth(self) -> float:
        """Bytes per second of a device-to-device copy (read + write), the roofline for a memory-bound kernel."""
        torch = self.torch
        size = (64 << 20) if self.smoke else (1 << 30)
        src = torch.empty(size, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        us = self.time_us(lambda _: dst.copy_(src), copies=1)
        return 2 * size / (us * 1e-6)

    def copies_past_l2(self, nbytes: int) -> int:
        """How many copies of a buffer make a rotation larger than twice the L2 cache."""
        if self.smoke:
            return 2
        return max(1, math.ceil(2 * self.l2_bytes / nbytes))

    # -- one case -----------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        print(f"device: {self.device_name}; copy bandwidth {self.copy_bytes_per_s / 1e9:.0f} GB/s")
        print(self.header())
        for n, k in args.shapes:
            # A group as large as K is per-channel: time it once.
            group_sizes = sorted({min(g or k, k) for g in args.group_sizes})
            for bits in args.bits:
                for group_size in group_sizes:
                    for symmetric in (True, False) if args.asymmetric else (True,):
                        self.run_format(n, k, bits, group_size, symmetric)
            if args.fp8:
                if self.fp8_ok:
                    self.run_format(n, k, "fp8", k, True)
                else:
                    print(f"skipping fp8: {self.device_name} has no fp8 conversions (needs compute capability 8.9+)")
        self.write()

    def run_format(self, n: int, k: int, bits: int | str, group_size: int, symmetric: bool) -> None:
        from bitalloc.kernels import reference
        from bitalloc.kernels.weights import Fp8Weight, PackedWeight

        torch = self.torch
        if bits != "fp8" and group_size < k and (group_size < 32 or group_size & (group_size - 1)):
            print(f"skipping group_size={group_size}: the kernels take powers of two >= 32 or per-channel")
            return
        gen = torch.Generator(device=self.device).manual_seed(n * 31 + k)
        if bits == "fp8":
            values = (torch.randn(n, k, device=self.device, generator=gen) * 8).to(torch.float8_e4m3fn)
            weight = Fp8Weight(values, (torch.rand(n, device=self.device, generator=gen) / 8).half())
        else:
            groups = -(-k // group_size)
            codes = torch.randint(0, 1 << bits, (n, k), device=self.device, generator=gen, dtype=torch.int32)
            scales = (torch.rand(n, groups, device=self.device, generator=gen) + 0.5) / (1 << (bits - 1))
            offsets = None if symmetric else -(1 << (bits - 1)) * scales
            weight = PackedWeight.from_codes(codes, scales, offsets, bits=bits, group_size=group_size)
            del codes
        weight_bytes = weight_nbytes(weight)
        copies = [weight] + [clone_weight(weight) for _ in range(self.copies_past_l2(weight_bytes) - 1)]
        for batch in self.args.batches:
            x = torch.randn(batch, k, device=self.device, generator=gen).half()
            entry = self.measure(weight, copies, x, bits, group_size, symmetric)
            expected = reference.matmul(x, weight).float()
            error = (self.quant_matmul(x, weight).float() - expected).abs().max()
            entry["max_rel_error"] = float(error / expected.abs().max().clamp_min(1e-6))
            self.entries.append(entry)
            print(self.row(entry), flush=True)
        del copies, weight
        if not self.smoke:
            torch.cuda.empty_cache()

    def quant_matmul(self, x, weight):
        from bitalloc.kernels.dispatch import quant_matmul

        return quant_matmul(x, weight)

    def measure(self, weight, copies: list, x, bits: int | str, group_size: int, symmetric: bool) -> dict:
        from bitalloc.kernels.gemv import GEMV_MAX_BATCH, choose_split_k

        n, k, batch = weight.out_features, weight.in_features, x.shape[0]
        us = self.time_us(lambda i: self.quant_matmul(x, copies[i]), len(copies))
        moved = weight_nbytes(weight) + 2 * x.numel() + 2 * batch * n
        ideal_us = moved / self.copy_bytes_per_s * 1e6
        fp16_us = self.fp16_baseline_us(n, k, batch, x)
        tiny_us = self.tinygemm_baseline_us(n, k, batch, group_size) if bits == 4 and symmetric else None
        gemv = batch <= GEMV_MAX_BATCH
        return {
            "format": format_name(bits, group_size, symmetric, k),
            "n": n,
            "k": k,
            "bits": 8 if bits == "fp8" else bits,
            "group_size": group_size if group_size < k else None,
            "symmetric": symmetric,
            "batch": batch,
            "kernel": "gemv" if gemv else "gemm",
            "split_k": choose_split_k(n, k, x.device) if gemv else 1,
            "us": us,
            "bytes": moved,
            "ideal_us": ideal_us,
            "efficiency": ideal_us / us,
            "gb_per_s": moved / (us * 1e-6) / 1e9,
            "fp16_us": fp16_us,
            "speedup_vs_fp16": fp16_us / us,
            "tinygemm_us": tiny_us,
            "speedup_vs_tinygemm": None if tiny_us is None else tiny_us / us,
        }

    # -- baselines ------------------------------------------------------------------

    def fp16_baseline_us(self, n: int, k: int, batch: int, x) -> float:
        """``x @ W^T`` with an fp16 weight through torch (cuBLAS), rotated past L2 like the kernels.

        Measured once per shape and batch, and recorded as an ``fp16`` entry of its own.
        """
        if (n, k, batch) not in self.fp16_us:
            torch = self.torch
            weights = [torch.randn(n, k, device=self.device).half() for _ in range(self.copies_past_l2(2 * n * k))]
            us = self.time_us(lambda i: torch.matmul(x, weights[i].T), len(weights))
            self.fp16_us[n, k, batch] = us
            moved = 2 * n * k + 2 * batch * k + 2 * batch * n
            ideal_us = moved / self.copy_bytes_per_s * 1e6
            entry = {
                "format": "fp16", "n": n, "k": k, "bits": 16, "group_size": None, "symmetric": True,
                "batch": batch, "kernel": "torch.matmul", "split_k": 1, "us": us, "bytes": moved,
                "ideal_us": ideal_us, "efficiency": ideal_us / us, "gb_per_s": moved / (us * 1e-6) / 1e9,
                "fp16_us": us, "speedup_vs_fp16": 1.0, "tinygemm_us": None, "speedup_vs_tinygemm": None,
                "max_rel_error": 0.0,
            }
            self.entries.append(entry)
            print(self.row(entry), flush=True)
        return self.fp16_us[n, k, batch]

    def tinygemm_baseline_us(self, n: int, k: int, batch: int, group_size: int) -> float | None:
        """``torch._weight_int4pack_mm`` (bf16 activations) on a 4-bit weight; None where it cannot run."""
        if (n, k, batch, group_size) not in self.tiny_us:
            self.tiny_us[n, k, batch, group_size] = self._tinygemm_us(n, k, batch, group_size)
        return self.tiny_us[n, k, batch, group_size]

    def _tinygemm_us(self, n: int, k: int, batch: int, group_size: int) -> float | None:
        torch = self.torch
        if group_size not in TINYGEMM_GROUPS or k % 128 or n % 8:
            return None
        codes = torch.randint(0, 16, (n, k), device=self.device, dtype=torch.int32)
        scales_and_zeros = torch.stack(
            [torch.rand(k // group_size, n, device=self.device) + 0.5, torch.zeros(k // group_size, n, device=self.device)],
            dim=-1,
        ).to(torch.bfloat16)
        x = torch.randn(batch, k, device=self.device).to(torch.bfloat16)
        try:
            if self.smoke:
                packed = torch._convert_weight_to_int4pack_for_cpu(codes, 8)
                matmul = torch._weight_int4pack_mm_for_cpu
            else:
                # CUDA tinygemm takes two codes per byte, the even one in the high nibble.
                pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
                packed = torch._convert_weight_to_int4pack(pairs, 8)
                matmul = torch._weight_int4pack_mm
            weights = [packed] + [packed.clone() for _ in range(self.copies_past_l2(n * k // 2) - 1)]
            return self.time_us(lambda i: matmul(x, weights[i], group_size, scales_and_zeros), len(weights))
        except (RuntimeError, AttributeError) as error:
            print(f"tinygemm unavailable ({type(error).__name__}: {str(error).splitlines()[0]})")
            return None

    # -- output ---------------------------------------------------------------------

    COLUMNS = [
        ("shape", 13), ("format", 15), ("batch", 5), ("kernel", 9), ("us", 9), ("GB/s", 7), ("eff", 5),
        ("fp16 us", 9), ("x fp16", 6), ("tiny us", 9), ("x tiny", 6), ("rel err", 8),
    ]

    def header(self) -> str:
        return "  ".join(name.rjust(width) for name, width in self.COLUMNS)

    def row(self, e: dict) -> str:
        def num(value, spec):
            return "-" if value is None else format(value, spec)

        kernel = e["kernel"] + (f"/{e['split_k']}" if e["split_k"] > 1 else "")
        cells = [
            f"{e['n']}x{e['k']}", e["format"], str(e["batch"]), kernel, num(e["us"], ".1f"), num(e["gb_per_s"], ".0f"),
            num(100 * e["efficiency"], ".0f") + "%", num(e["fp16_us"], ".1f"), num(e["speedup_vs_fp16"], ".2f"),
            num(e["tinygemm_us"], ".1f"), num(e["speedup_vs_tinygemm"], ".2f"), num(e["max_rel_error"], ".1e"),
        ]
        return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, self.COLUMNS))

    def write(self) -> None:
        import torch
        import triton

        from bitalloc.quant.costs import PACKAGED_LATENCY_DIR

        path = self.args.out
        if path is None:
            name = f"kernels_{slug(self.device_name)}.json"
            path = Path(tempfile.mkdtemp()) / name if self.smoke else PACKAGED_LATENCY_DIR / name
            path.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(path.read_text()).get("entries", []) if path.exists() else []
        fresh = {entry_key(e) for e in self.entries}
        results = {
            "device": self.device_name,
            "copy_bandwidth_gb_per_s": self.copy_bytes_per_s / 1e9,
            "l2_bytes": self.l2_bytes,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "entries": sorted(
                [e for e in previous if entry_key(e) not in fresh] + self.entries, key=entry_key
            ),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {len(self.entries)} entries to {path}")


def format_name(bits: int | str, group_size: int, symmetric: bool, k: int) -> str:
    """The format's name as ``quant.formats`` spells it: int4_g128, int3_g64_asym, int8_pc, fp8_e4m3."""
    if bits == "fp8":
        return "fp8_e4m3"
    name = f"int{bits}_" + (f"g{group_size}" if group_size < k else "pc")
    return name if symmetric else name + "_asym"


def entry_key(entry: dict) -> tuple:
    return (entry["format"], entry["n"], entry["k"], entry["batch"])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def weight_nbytes(weight) -> int:
    """Bytes a kernel reads for the weight: packed codes (or fp8 values), scales and offsets."""
    from bitalloc.kernels.weights import Fp8Weight

    if isinstance(weight, Fp8Weight):
        tensors = [weight.values, weight.scales]
    else:
        tensors = [*weight.planes, weight.scales, weight.offsets]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def clone_weight(weight):
    """A copy in fresh memory, so that a rotation of copies defeats the L2 cache."""
    from dataclasses import replace

    from bitalloc.kernels.weights import Fp8Weight

    if isinstance(weight, Fp8Weight):
        return Fp8Weight(weight.values.clone(), weight.scales.clone())
    offsets = None if weight.offsets is None else weight.offsets.clone()
    return replace(weight, planes=tuple(p.clone() for p in weight.planes), scales=weight.scales.clone(), offsets=offsets)


if __name__ == "__main__":
    main()
