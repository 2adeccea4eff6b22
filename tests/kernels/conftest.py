"""Kernel tests: the Triton interpreter on CPU here, the compiled kernels where CUDA is present.

``TRITON_INTERPRET`` must be set before the kernels are decorated, that is
before ``kernels`` is first imported, so it is set at the top of this file.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bitalloc.kernels.configs import INTERPRET  # noqa: E402
from bitalloc.kernels.gemm import _gemm_kernel  # noqa: E402
from bitalloc.kernels.gemv import _gemv_kernel  # noqa: E402
from bitalloc.kernels.weights import PackedWeight  # noqa: E402

TUNED_KERNELS = (_gemv_kernel, _gemm_kernel)


@pytest.fixture(scope="session", autouse=True)
def first_config_only():
    """On a GPU, run each kernel with its first candidate config.

    Autotuning would compile every candidate for each of the many small cases;
    test_kernels_gpu.py checks the candidates one by one instead.
    """
    saved = [kernel.configs for kernel in TUNED_KERNELS]
    if not INTERPRET:
        for kernel in TUNED_KERNELS:
            kernel.configs = kernel.configs[:1]
    yield
    for kernel, configs in zip(TUNED_KERNELS, saved):
        kernel.configs = configs


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernel tests run: CPU tensors under the interpreter, else the GPU."""
    return torch.device("cpu" if INTERPRET else "cuda")


@pytest.fixture(scope="session")
def make_weight(device):
    """Build a random PackedWeight whose dequantised values are of order 1.

    ``codes`` picks the code pattern: "random", "min" (all 0), "max" (all 2**bits - 1)
    or "extremes" (each code 0 or 2**bits - 1 at random, so neighbours in a word differ).
    """

    def build(n: int, k: int, bits: int, group_size: int | None = None, symmetric: bool = True,
              codes: str = "random", seed: int = 0) -> PackedWeight:
        gen = torch.Generator().manual_seed(seed)
        top = (1 << bits) - 1
        if codes == "random":
            q = torch.randint(0, top + 1, (n, k), generator=gen)
        elif codes == "min":
            q = torch.zeros(n, k, dtype=torch.int64)
        elif codes == "max":
            q = torch.full((n, k), top)
        elif codes == "extremes":
            q = torch.randint(0, 2, (n, k), generator=gen) * top
        else:
            raise ValueError(codes)
        groups = 1 if group_size is None else -(-k // group_size)
        scales = (torch.rand(n, groups, generator=gen) + 0.5) / (1 << (bits - 1))
        offsets = None
        if not symmetric:
            offsets = -(1 << (bits - 1)) * scales + 0.2 * torch.randn(n, groups, generator=gen)
        weight = PackedWeight.from_codes(q, scales, offsets, bits=bits, group_size=group_size)
        return PackedWeight(
            tuple(p.to(device) for p in weight.planes), weight.scales.to(device),
            None if offsets is None else weight.offsets.to(device), bits, weight.group_size, k,
        )

    return build


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Equal up to ``rel`` times the largest magnitude of ``expected`` (sums reorder, so not bitwise)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.float().abs().max().clamp_min(1.0)
    error = (actual.float() - expected.float()).abs().max()
    assert error <= rel * scale, f"max error {error:.3g} exceeds {rel:g} x {scale:.3g}"


@pytest.fixture(scope="session")
def close():
    return assert_matches
