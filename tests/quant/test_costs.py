import json

import pytest

from bitalloc.quant.costs import KERNEL_OVERHEAD_S, LatencyModel, hardware_slug
from bitalloc.quant.formats import get_format
from bitalloc.quant.units import Unit

UNIT = Unit("model.layers.0.mlp.down_proj", "weight", (4096, 4096), 0)


def test_roofline_is_labelled_as_an_estimate(monkeypatch, tmp_path):
    monkeypatch.setenv("BITALLOC_LATENCY_DIR", str(tmp_path))
    model = LatencyModel.for_hardware("made-up-h100-board")
    assert "roofline estimate" in model.source
    fmt = get_format("int4_g128")
    nbytes = fmt.nbytes(UNIT.shape)
    assert model.seconds(UNIT, fmt, nbytes) == pytest.approx(nbytes / 3.35e12 + KERNEL_OVERHEAD_S)


def test_a_measured_table_is_used_by_format(monkeypatch, tmp_path):
    entries = [
        {"format": "int4_g128", "n": 4096, "k": 4096, "bits": 4, "group_size": 128, "batch": 1, "us": 10.0, "bytes": 2_000_000},
        {"format": "int4_g128_asym", "n": 4096, "k": 4096, "bits": 4, "group_size": 128, "batch": 1, "us": 40.0, "bytes": 2_000_000},
        {"format": "int4_g128", "n": 8192, "k": 28672, "bits": 4, "group_size": 128, "batch": 1, "us": 500.0, "bytes": 1e8},
    ]
    name = "NVIDIA H100 80GB HBM3"
    (tmp_path / f"kernels_{hardware_slug(name)}.json").write_text(json.dumps({"device": name, "entries": entries}))
    monkeypatch.setenv("BITALLOC_LATENCY_DIR", str(tmp_path))
    model = LatencyModel.for_hardware(name)
    assert "measured" in model.source
    fmt = get_format("int4_g128")
    # Nearest measured shape runs 2e6 bytes in 10 us: 2e11 bytes/s.
    assert model.seconds(UNIT, fmt, 1_000_000) == pytest.approx(1e6 / 2e11 + KERNEL_OVERHEAD_S)
    asym = get_format("int4_g128_asym")
    assert model.seconds(UNIT, asym, 1_000_000) == pytest.approx(1e6 / 5e10 + KERNEL_OVERHEAD_S)
    # A format the table lacks falls back to the roofline.
    nf4 = get_format("nf4_g64")
    assert model.seconds(UNIT, nf4, 1_000_000) == pytest.approx(1e6 / 3.35e12 + KERNEL_OVERHEAD_S)
