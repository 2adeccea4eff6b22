"""The packed layout: exact round trips, the documented bit positions, exact byte counts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.kernels.packing import PLANES, pack, packed_nbytes, plane_words, unpack

BITS = sorted(PLANES)


def pack_by_hand(codes: list[list[int]], bits: int) -> list[list[list[int]]]:
    """The storage convention written out one code at a time, as unsigned 32-bit words."""
    planes, shift = [], 0
    for width in PLANES[bits]:
        per_word = 32 // width
        plane = []
        for row in codes:
            words = [0] * plane_words(len(row), width)
            for k, code in enumerate(row):
                field = (code >> shift) & ((1 << width) - 1)
                words[k // per_word] |= field << (k % per_word * width)
            plane.append(words)
        planes.append(plane)
        shift += width
    return planes


codes_cases = st.tuples(st.sampled_from(BITS), st.integers(1, 4), st.integers(1, 80), st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(codes_cases)
def test_pack_matches_the_documented_layout(case):
    bits, n, k, seed = case
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    expected = pack_by_hand(codes.tolist(), bits)
    assert len(packed) == len(expected)
    for plane, words in zip(packed, expected):
        assert plane.dtype == torch.int32
        assert (plane.to(torch.int64) & 0xFFFFFFFF).tolist() == words


@settings(max_examples=100, deadline=None)
@given(codes_cases, st.sampled_from(["random", "min", "max"]))
def test_unpack_inverts_pack(case, fill):
    bits, n, k, seed = case
    top = (1 << bits) - 1
    codes = {
        "random": torch.randint(0, top + 1, (n, k), generator=torch.Generator().manual_seed(seed)),
        "min": torch.zeros(n, k, dtype=torch.int64),
        "max": torch.full((n, k), top),
    }[fill]
    restored = unpack(pack(codes, bits), k, bits)
    assert restored.dtype == torch.uint8
    assert torch.equal(restored.to(torch.int64), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100, 4096])
def test_packed_nbytes_is_the_real_size(bits, k):
    planes = pack(torch.zeros(3, k, dtype=torch.int64), bits)
    assert packed_nbytes(3, k, bits) == sum(p.numel() * p.element_size() for p in planes)


@pytest.mark.parametrize("bits", BITS)
def test_packed_size_is_bits_per_code_when_k_fills_words(bits):
    assert packed_nbytes(7, 4096, bits) * 8 == 7 * 4096 * bits


def test_low_bits_go_in_the_first_plane():
    lo, hi = pack(torch.tensor([[0b101, 0b011]]), 3)
    assert lo.tolist() == [[0b01 | 0b11 << 2]]
    assert hi.tolist() == [[0b1 | 0b0 << 1]]


def test_top_code_sets_the_sign_bit_of_the_word():
    (plane,) = pack(torch.tensor([[0, 0, 0, 255]]), 8)
    assert plane.tolist() == [[-(1 << 24)]]


@pytest.mark.parametrize("bad", [-1, 16])
def test_pack_rejects_codes_out_of_range(bad):
    with pytest.raises(ValueError, match=r"codes: values must lie in \[0, 15\]"):
        pack(torch.tensor([[0, bad]]), 4)


def test_pack_rejects_unsupported_widths_and_float_codes():
    with pytest.raises(ValueError, match="bits=7"):
        pack(torch.zeros(1, 4, dtype=torch.int64), 7)
    with pytest.raises(TypeError, match="integer"):
        pack(torch.zeros(1, 4), 4)


def test_unpack_rejects_a_plane_of_the_wrong_width():
    planes = pack(torch.zeros(2, 64, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"int32 \[N, 9\]"):
        unpack(planes, 65, 4)
