import math

import pytest
import torch

from bitalloc.quant.formats import INT_BITS, IntFormat, LookupFormat, get_format, parse_formats, standard_formats


def test_registry_lists_every_required_format():
    names = {f.name for f in standard_formats()}
    for bits in INT_BITS:
        for group in ("g32", "g64", "g128", "pc"):
            assert f"int{bits}_{group}" in names and f"int{bits}_{group}_asym" in names
    assert {"nf4_g64", "fp8_e4m3", "fp6_e3m2", "fp4_e2m1", "bf16", "fp16"} <= names


@pytest.mark.parametrize("name", [f.name for f in standard_formats()])
def test_names_round_trip(name):
    assert get_format(name).name == name


@pytest.mark.parametrize("bad", ["int7_g128", "int4_g100", "int4", "fp5_e2m2", "", "int4_g128_sym"])
def test_unknown_formats_are_rejected_with_the_name(bad):
    with pytest.raises(ValueError, match="format"):
        get_format(bad)


def test_parse_formats_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        parse_formats("int4_g128,int4_g128")


def hand_count(bits: int, group: int | None, symmetric: bool, n: int, k: int) -> int:
    """Bytes by the storage rule, counted plane by plane in whole 32-bit words."""
    planes = {2: [2], 3: [2, 1], 4: [4], 5: [4, 1], 6: [4, 2], 8: [8]}[bits]
    words = sum(math.ceil(k * p / 32) for p in planes)
    groups = 1 if group is None else math.ceil(k / group)
    return n * words * 4 + n * groups * 2 * (1 if symmetric else 2)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(576, 576), (192, 1536), (7, 100)])
def test_integer_bytes_are_exact(bits, group, symmetric, shape):
    assert IntFormat(bits, group, symmetric).nbytes(shape) == hand_count(bits, group, symmetric, *shape)


def test_integer_bytes_hand_examples():
    # 4-bit, 4096x4096, groups of 128: 8 MiB of codes + 4096*32 float16 scales.
    assert get_format("int4_g128").nbytes((4096, 4096)) == 4096 * 4096 // 2 + 4096 * 32 * 2
    # 3 bits = a 2-bit plane (K=100 -> 7 words) + a 1-bit plane (4 words) per row.
    assert get_format("int3_g64_asym").nbytes((1, 100)) == (7 + 4) * 4 + 2 * 2 * 2
    assert get_format("bf16").nbytes((10, 10)) == 200
    assert get_format("fp8_e4m3").nbytes((10, 64)) == 10 * 64 + 10 * 2
    assert get_format("nf4_g64").nbytes((2, 128)) == 2 * 64 + 2 * 2 * 2


def random_weight(n=24, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("group", [32, 64, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_within_half_a_step_and_codes_in_range(bits, group, symmetric):
    fmt = IntFormat(bits, group, symmetric)
    w = random_weight()
    q = fmt.quantize(w)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= fmt.max_code and int(q.codes.min()) >= 0
    step = q.scales.float().repeat_interleave(group or w.shape[1], dim=1)[:, : w.shape[1]]
    err = (q.dequantize() - w).abs()
    # Half a step, plus float16 rounding of the stored scale/offset (relative 2**-11 of a
    # value up to 2**(bits-1) steps from the offset).
    assert torch.all(err <= step * (0.5 + 2**-11 * 2 ** (bits - 1)) + 1e-6)


@pytest.mark.parametrize("bits", INT_BITS)
def test_largest_and_smallest_codes_are_used(bits):
    w = random_weight(8, 256, seed=bits)
    for symmetric in (True, False):
        fmt = IntFormat(bits, 64, symmetric)
        codes = fmt.quantize(w).codes
        assert int(codes.max()) == fmt.max_code
        assert int(codes.min()) == 0


def test_fake_quantize_equals_dequantized_codes():
    w = random_weight()
    for fmt in standard_formats():
        if fmt.is_keep:
            continue
        assert torch.equal(fmt.fake_quantize(w), fmt.quantize(w).dequantize().to(w.dtype)), fmt.name


def test_asymmetric_grid_is_reproduced_exactly():
    """A weight already on a 4-bit asymmetric grid (like a Q4_1 GGUF) survives int4_g32_asym."""
    g = torch.Generator().manual_seed(1)
    scales = (torch.rand(16, 4, generator=g) * 0.01 + 0.001).half().float()
    mins = (-torch.rand(16, 4, generator=g) * 0.05).half().float()
    codes = torch.randint(0, 16, (16, 128), generator=g).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15
    w = codes * scales.repeat_interleave(32, 1) + mins.repeat_interleave(32, 1)
    assert torch.equal(get_format("int4_g32_asym").fake_quantize(w), w)
    assert not torch.equal(get_format("int4_g32").fake_quantize(w), w)


@pytest.mark.parametrize("name", ["nf4_g64", "fp8_e4m3", "fp6_e3m2", "fp4_e2m1"])
def test_lookup_formats_pick_the_nearest_level(name):
    fmt = get_format(name)
    assert isinstance(fmt, LookupFormat)
    w = random_weight(6, 128, seed=3)
    q = fmt.quantize(w)
    assert int(q.codes.max()) < 2**fmt.bits
    levels = torch.tensor([v for v in fmt.levels if not math.isnan(v)])
    scale = q.scales.float().repeat_interleave(fmt.group_size or 128, 1)[:, :128]
    candidates = levels[None, None, :] * scale[..., None]
    best = (candidates - w[..., None]).abs().min(dim=-1).values
    assert torch.allclose((q.dequantize() - w).abs(), best, atol=1e-7)
    assert not torch.isnan(q.dequantize()).any()


def test_minifloat_tables_match_torch_float8():
    fmt = get_format("fp8_e4m3")
    finite = torch.tensor([v for v in fmt.levels if not math.isnan(v)])
    assert float(finite.max()) == 448.0
    as_torch = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ours = torch.tensor(fmt.levels)
    mask = ~torch.isnan(as_torch)
    assert torch.equal(ours[mask], as_torch[mask])
    assert sorted(set(get_format("fp4_e2m1").levels)) == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_keep_format_rounds_to_16_bit_only():
    w = random_weight()
    assert torch.equal(get_format("bf16").fake_quantize(w), w.to(torch.bfloat16).float())
    assert torch.equal(get_format("fp16").fake_quantize(w), w.half().float())
