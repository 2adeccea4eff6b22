"""``bitalloc export``: a solved allocation file and its profile in, a runtime's file out (or the refusal)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from bitalloc.quant.profile import Profile
from bitalloc.quant.units import Unit
from bitalloc.service.cli import app

UNITS = [Unit("model.layers.0.self_attn.q_proj", "weight", (64, 256), 0),
         Unit("model.layers.0.self_attn.k_proj", "weight", (32, 256), 0),
         Unit("model.layers.0.mlp.down_proj", "weight", (256, 512), 0)]


def write_inputs(tmp_path, formats: dict[str, str]) -> tuple[str, str]:
    shape = (len(UNITS), 1)
    profile = Profile(UNITS, ["int4_g64"], np.zeros(shape), np.zeros(shape, np.int64), np.zeros(shape),
                      np.ones(shape, bool), [[u.name for u in UNITS[:2]]], {"model": "factory:tiny-llama", "key": "k1"})
    allocation = tmp_path / "alloc.json"
    allocation.write_text(json.dumps({"formats": formats, "solver": "dp", "error": 0.25, "latency": None,
                                      "measured": None, "bytes": 1, "avg_bits": 4.0, "info": {}}))
    return str(profile.save(tmp_path / "profile.npz")), str(allocation)


def test_export_writes_each_format_and_refuses_with_the_units_named(tmp_path):
    runner = CliRunner()
    profile, allocation = write_inputs(tmp_path, {u.name: "int4_g64" for u in UNITS})
    out = tmp_path / "out" / "quantize_config.json"
    done = runner.invoke(app, ["export", "--profile", profile, "--allocation", allocation, "--format", "gptqmodel",
                               "--out", str(out)])
    assert done.exit_code == 0, done.output
    config = json.loads(out.read_text())
    assert (config["bits"], config["group_size"]) == (4, 64)
    assert config["meta"]["bitalloc"]["profile"]["key"] == "k1" and config["meta"]["bitalloc"]["solver"] == "dp"

    done = runner.invoke(app, ["export", "--profile", profile, "--allocation", allocation, "--out",
                               str(tmp_path / "own.json")])
    assert done.exit_code == 0 and json.loads((tmp_path / "own.json").read_text())["totals"]["error"] == 0.25

    profile, allocation = write_inputs(tmp_path, {**{u.name: "int4_g64" for u in UNITS}, UNITS[2].name: "nf4_g64"})
    done = runner.invoke(app, ["export", "--profile", profile, "--allocation", allocation, "--format",
                               "compressed-tensors", "--out", str(tmp_path / "ct.json")])
    assert done.exit_code == 1 and not (tmp_path / "ct.json").exists()
    assert "nf4_g64: compressed-tensors has no NormalFloat codebook" in done.output
    assert "model.layers.0.mlp.down_proj" in done.output
    done = runner.invoke(app, ["export", "--profile", profile, "--allocation", allocation, "--format", "onnx"])
    assert done.exit_code == 2 and "unknown format 'onnx'" in done.output
