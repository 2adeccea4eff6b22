"""A model streamed block by block profiles to the same cells as the model loaded whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitalloc.quant.calibration import calibration_for
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.loading import LoadPolicy, ModelLoadError, load_model
from bitalloc.quant.profile import ProfileCache, build_profile
from bitalloc.quant.states import BoundaryStates
from bitalloc.quant.stream import Checkpoint, StreamedModel, decoder_blocks, load_within, open_streamed

FORMATS = parse_formats("int2_g32,int4_g32_asym,int8_g32")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sharded(tiny_llama, tmp_path_factory):
    """The tiny random Llama saved as several safetensors shards with an index, as hubs ship models."""
    folder = tmp_path_factory.mktemp("sharded")
    tiny_llama.module.save_pretrained(folder, max_shard_size="100KB")
    tiny_llama.tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.fixture(scope="module")
def calibration(tiny_llama):
    """Windows of the reference calibration text (tokenized once: it takes seconds)."""
    return calibration_for(tiny_llama, None, seq_len=32, count=6)


def profiles(folder, calibration, dtype: torch.dtype, method: str = "rtn"):
    whole = load_model(str(folder), dtype=dtype)
    streamed = open_streamed(folder, str(folder), dtype, CPU)
    return [build_profile(model, model.units(), FORMATS, "output_mse", calibration, method=method)
            for model in (whole, streamed)]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_output_mse_equals_the_whole_model_in_fp32(sharded, calibration, method):
    whole, streamed = profiles(sharded, calibration, torch.float32, method)
    assert streamed.unit_names == whole.unit_names and streamed.tie_groups == whole.tie_groups
    assert streamed.meta["streamed"] and not whole.meta["streamed"]
    assert np.all(whole.error > 0)
    np.testing.assert_allclose(streamed.error, whole.error, rtol=1e-4, atol=0)


def test_streamed_hessian_trace_equals_the_whole_model_with_the_same_seed(sharded, calibration):
    """The Hutchinson vectors are drawn per (seed, batch, sample, unit), so the forward-over-reverse
    products block by block estimate the very same traces as the whole model's double backward."""
    short = calibration.head(4, 16)
    options = {"hutchinson_samples": 2, "hutchinson_seed": 3}
    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    cells = [build_profile(m, m.units(), FORMATS, "hessian_trace", short, options=options).error
             for m in (whole, streamed)]
    assert np.all(cells[0] != 0)
    np.testing.assert_allclose(cells[1], cells[0], rtol=1e-4, atol=0)
    other = build_profile(whole, whole.units(), FORMATS, "hessian_trace", short,
                          options={**options, "hutchinson_seed": 4}).error
    assert not np.allclose(other, cells[0], rtol=1e-2)  # the seed matters: the agreement is not by chance


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_fisher_mse_equals_the_whole_model_in_fp32(sharded, calibration, method):
    """The output Fisher pulled back block by block from the head, with the labels drawn in the
    same order from the same generator, is the whole model's backward pass."""
    options = {"fisher_seed": 5}
    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    cells = [build_profile(m, m.units(), FORMATS, "fisher_mse", calibration, method=method, options=options).error
             for m in (whole, streamed)]
    assert np.all(cells[0] > 0)
    np.testing.assert_allclose(cells[1], cells[0], rtol=1e-4, atol=0)


def test_streamed_hessian_trace_reads_its_window_options_as_the_whole_model_does(sharded, calibration):
    options = {"hutchinson_samples": 2, "hutchinson_windows": 2, "hutchinson_tokens": 8}
    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    cells = [build_profile(m, m.units(), FORMATS, "hessian_trace", calibration, options=options).error
             for m in (whole, streamed)]
    np.testing.assert_allclose(cells[1], cells[0], rtol=1e-4, atol=0)
    every = build_profile(whole, whole.units(), FORMATS, "hessian_trace", calibration,
                          options={"hutchinson_samples": 2}).error
    assert not np.allclose(every, cells[0], rtol=1e-2)  # the options do narrow what is traced


def test_bf16_streams_the_same_way_and_agrees_with_fp32(sharded, calibration):
    """bf16 (weights and activations rounded to bf16, the Hessian sums in fp32 and wider) streamed
    equals bf16 loaded whole within 1e-4, and fp32 within 10 % per cell and 2.5 % in the median,
    the tolerance ``test_profile`` states for bf16 on the whole model."""
    whole, streamed = profiles(sharded, calibration, torch.bfloat16)
    assert streamed.meta["dtype"] == "bfloat16"
    np.testing.assert_allclose(streamed.error, whole.error, rtol=1e-4, atol=0)
    fp32, _ = profiles(sharded, calibration, torch.float32)
    relative = np.abs(streamed.error - fp32.error) / np.abs(fp32.error)
    assert relative.max() < 0.10 and np.median(relative) < 0.025


def test_at_most_one_block_holds_weights_at_any_time(sharded, calibration):
    model = open_streamed(sharded, str(sharded), torch.float32, CPU)
    real = []

    def count(_module, _args):
        real.append(sum(any(p.device.type != "meta" for p in block.parameters()) for block in model.blocks))

    handles = [block.register_forward_pre_hook(count) for block in model.blocks]
    build_profile(model, model.units(), FORMATS, "output_mse", calibration)
    for handle in handles:
        handle.remove()
    batches = len(calibration.batches(4))
    assert len(real) >= len(model.blocks) * batches and max(real) == 1
    assert all(p.device.type == "meta" for p in model.blocks.parameters())
    outside = [p for name, p in model.module.named_parameters() if not name.startswith(model.blocks_path)]
    assert outside and all(p.device.type == "cpu" for p in outside)


def test_the_blocks_are_found_by_shape_not_by_name(tiny_llama):
    path, blocks = decoder_blocks(tiny_llama.module)
    assert path == "model.layers" and len(blocks) == tiny_llama.module.config.num_hidden_layers
    with pytest.raises(ModelLoadError, match="no list of repeated blocks"):
        decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_checkpoint_reads_tensors_by_name_and_counts_bytes_from_headers(sharded, tiny_llama):
    checkpoint = Checkpoint.open(sharded)
    state = tiny_llama.module.state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    read = checkpoint.read([name], CPU, torch.bfloat16)[name]
    assert read.dtype == torch.bfloat16 and torch.equal(read, state[name].to(torch.bfloat16))
    stored = set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"])
    assert checkpoint.nbytes(torch.float32) == sum(state[n].numel() * 4 for n in stored)
    with pytest.raises(ModelLoadError, match="no tensor 'nope'"):
        checkpoint.read(["nope"], CPU, torch.float32)


def test_load_within_streams_only_what_does_not_fit(sharded):
    size = Checkpoint.open(sharded).nbytes(torch.float32)
    fits = load_within(str(sharded), LoadPolicy(), dtype=torch.float32, device=CPU, max_memory=size)
    assert not isinstance(fits, StreamedModel)
    tight = load_within(str(sharded), LoadPolicy(), dtype=torch.float32, device=CPU, max_memory=size - 1)
    asked = load_within(str(sharded), LoadPolicy(), dtype=torch.float32, device=CPU, stream=True)
    assert isinstance(tight, StreamedModel) and isinstance(asked, StreamedModel)
    assert "more than the" in tight.info["streamed"] and "max_memory allows" in tight.info["streamed"]
    with pytest.raises(ModelLoadError, match="cannot be streamed block by block"):
        load_within("factory:tiny-llama", LoadPolicy(), dtype=torch.float32, device=CPU, stream=True)


def test_a_metric_without_a_streamed_form_is_refused_by_name(sharded, calibration, monkeypatch):
    from bitalloc.quant.metrics import METRICS

    monkeypatch.setitem(METRICS, "novel", METRICS["output_mse"])
    model = open_streamed(sharded, str(sharded), torch.float32, CPU)
    with pytest.raises(ValueError, match="metric 'novel' cannot run on a model streamed"):
        build_profile(model, model.units(), FORMATS, "novel", calibration)
    for metric in ("kl", "fisher"):
        with pytest.raises(ValueError, match=f"metric '{metric}' walks the whole model"):
            build_profile(model, model.units(), FORMATS, metric, calibration, shards=2)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_streamed_empirical_fisher_equals_the_whole_model_s(sharded, calibration, method):
    """``fisher``: each window's weight gradients, squared while their block is read in the reverse walk."""
    cells = [build_profile(m, m.units(), FORMATS, "fisher", calibration, method=method).error
             for m in (load_model(str(sharded)), open_streamed(sharded, str(sharded), torch.float32, CPU))]
    assert (cells[0][:, 0] > 0).all()
    np.testing.assert_allclose(cells[1], cells[0], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_streamed_kl_metric_scores_each_cell_as_the_whole_model_does(sharded, calibration, method):
    """``kl`` scores each cell through ``quant.execution``: on a streamed model, one walk of every
    block per cell (under GPTQ, each block's Hessians summed on the way)."""
    options = {"units": ["*.0.self_attn.q_proj", "*.1.mlp.down_proj"], "kl_tokens": 64}
    cells = [build_profile(m, m.units(), FORMATS, "kl", calibration, method=method, options=options).error
             for m in (load_model(str(sharded)), open_streamed(sharded, str(sharded), torch.float32, CPU))]
    measured = ~np.isnan(cells[0])
    assert measured.sum() == 2 * len(FORMATS) and (cells[0][measured[:, 0], 0] > 0).all()  # int2 moves the output
    np.testing.assert_array_equal(np.isnan(cells[1]), ~measured)
    np.testing.assert_allclose(cells[1][measured], cells[0][measured], rtol=1e-4, atol=1e-9)


def test_the_cache_keys_a_streamed_profile_by_its_checkpoint_and_dtype(sharded, calibration, tmp_path):
    cache = ProfileCache(tmp_path)
    keys = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        model = open_streamed(sharded, str(sharded), dtype, CPU)
        profile, cached = cache.get_or_build(model, model.units(), FORMATS, "output_mse", calibration)
        assert cached == (profile.meta["key"] in keys)
        keys.add(profile.meta["key"])
    assert len(keys) == 2


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["output_mse", "fisher_mse", "hessian_trace"])
def test_streamed_smollm2_equals_the_whole_model(smollm2, zoo, metric):
    """The real reference model, from its single-file checkpoint."""
    from bitalloc.quant.zoo import zoo_model_dir

    folder = zoo_model_dir("llm")
    streamed = open_streamed(folder, "zoo:llm", torch.float32, CPU)
    calibration = calibration_for(smollm2, None, seq_len=32, count=2)
    formats = parse_formats("int4_g64")
    options = {"hutchinson_samples": 1}
    whole = build_profile(smollm2, smollm2.units(), formats, metric, calibration, options=options)
    stream = build_profile(streamed, streamed.units(), formats, metric, calibration, options=options)
    assert stream.unit_names == whole.unit_names
    # A Hutchinson estimate is a sum of terms of both signs: where they cancel, fp32's order of
    # summation (forward-over-reverse block by block, or one double backward) moves the small
    # result relatively more, so those cells are held to 1e-4 of the largest cell instead.
    atol = 1e-4 * np.abs(whole.error).max() if metric == "hessian_trace" else 0
    np.testing.assert_allclose(stream.error, whole.error, rtol=1e-4, atol=atol)


def test_a_streamed_model_evaluates_as_the_model_held_whole(sharded, calibration):
    """Held-out scoring and the fitness measure run through ``quant.execution``: block by block,
    each block's units quantized while it is read, they give the whole model's figures."""
    from bitalloc.quant.evaluate import Evaluator, MeasuredKL

    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    units = whole.units().weights
    allocation = {u.name: ("int2_g32" if i % 3 == 0 else "int4_g32_asym") for i, u in enumerate(units)}
    windows = calibration.head(5)  # two batches of two windows and one of one
    scored = [Evaluator(model, windows, batch_size=2).evaluate(allocation) for model in (whole, streamed)]
    assert scored[0].kl > 1e-4  # the allocation changes the (random-weight) model
    assert scored[1].kl == pytest.approx(scored[0].kl, rel=1e-5)
    assert scored[1].perplexity == pytest.approx(scored[0].perplexity, rel=1e-5)
    assert scored[1].reference_perplexity == pytest.approx(scored[0].reference_perplexity, rel=1e-5)
    np.testing.assert_allclose(scored[1].window_kl, scored[0].window_kl, rtol=1e-4)
    nothing = Evaluator(streamed, windows, batch_size=2).evaluate({})
    assert nothing.kl == pytest.approx(0.0, abs=1e-7)  # the checkpoint is read as it is: the weights were put back

    measure = MeasuredKL(Evaluator(streamed, windows, batch_size=2))
    fewer = measure(types_namespace(allocation), samples=2 * 32)
    np.testing.assert_allclose(fewer, scored[0].window_kl[:2], rtol=1e-4)


def test_a_streamed_gptq_point_evaluates_as_the_model_held_whole(sharded, calibration):
    """GPTQ's Hessians summed block by block beside the scored walk (``BlockHessians``) quantize
    each block as the whole model's calibration Hessians do."""
    from bitalloc.quant.evaluate import Evaluator
    from bitalloc.quant.hessian import BlockHessians, calibration_hessians

    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    units = whole.units()
    allocation = {u.name: ("int2_g32" if i % 2 else "int4_g32_asym") for i, u in enumerate(units.weights)}
    windows = calibration.head(3)
    hessians = calibration_hessians(whole.module, units, calibration)
    scored = [Evaluator(whole, windows, batch_size=2).evaluate(allocation, method="gptq", hessians=hessians),
              Evaluator(streamed, windows, batch_size=2).evaluate(allocation, method="gptq",
                                                                  hessians=BlockHessians(streamed.units(), calibration))]
    rtn = Evaluator(whole, windows, batch_size=2).evaluate(allocation)
    assert scored[0].kl != pytest.approx(rtn.kl, rel=1e-3)  # GPTQ moved the weights: the Hessians were used
    assert scored[1].kl == pytest.approx(scored[0].kl, rel=1e-4)
    np.testing.assert_allclose(scored[1].window_kl, scored[0].window_kl, rtol=1e-3)
    with pytest.raises(TypeError, match="BlockHessians"):
        Evaluator(whole, windows).evaluate(allocation, method="gptq", hessians=BlockHessians(units, calibration))


def test_gradients_through_a_streamed_model_are_refused_clearly(sharded, calibration):
    from bitalloc.quant.execution import logits

    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    with pytest.raises(ValueError, match="gradients cannot flow through a model streamed"):
        next(logits(streamed, [calibration.inputs[:1]]))


def types_namespace(allocation: dict[str, str]):
    """An assignment as ``search.Allocation`` hands it over: something with ``formats``."""
    from types import SimpleNamespace

    return SimpleNamespace(formats=allocation)


@pytest.mark.parametrize("metric", ["output_mse", "fisher_mse", "hessian_trace"])
def test_a_profile_measured_in_block_range_shards_is_the_unsharded_one(sharded, calibration, metric):
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    short = calibration.head(4, 16)
    options = {"hutchinson_samples": 2}
    one, two = (build_profile(streamed, streamed.units(), FORMATS, metric, short, options=options, shards=n).error
                for n in (1, 2))  # the tiny model has two blocks
    assert np.all(one != 0)
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=0)


def test_shards_cover_the_blocks_and_a_merge_refuses_holes_and_repeats():
    from bitalloc.quant.shards import ShardRows, merge, plan

    layout = plan(7, 3)
    assert [list(s.blocks) for s in layout] == [[0, 1], [2, 3, 4], [5, 6]]
    with pytest.raises(ValueError, match="between 1 and the model's 7 decoder blocks"):
        plan(7, 8)
    parts = [ShardRows(0, [0, 1], np.ones((2, 2))), ShardRows(1, [2], np.full((1, 2), 2.0))]
    two = plan(2, 2)
    np.testing.assert_array_equal(merge(two, parts, 3, 2), [[1, 1], [1, 1], [2, 2]])
    with pytest.raises(ValueError, match="from shards \\[0\\]"):
        merge(two, parts[:1], 3, 2)
    with pytest.raises(ValueError, match="from shards \\[0, 1, 1\\]"):
        merge(two, [*parts, parts[1]], 3, 2)
    with pytest.raises(ValueError, match="exactly once"):
        merge(two, [parts[0], ShardRows(1, [1], np.ones((1, 2)))], 3, 2)


def test_shards_split_only_a_streamed_profile(tiny_llama, calibration):
    with pytest.raises(ValueError, match="shards split a profile streamed block by block"):
        build_profile(tiny_llama, tiny_llama.units(), FORMATS, "output_mse", calibration, shards=2)


def test_checkpoint_files_are_fingerprinted_without_reading_them_again(sharded, tmp_path):
    """A hub cache's blob is known by its name (its sha256); a file hashed before is known by its
    inode, size and mtime; anything else is read and hashed."""
    import hashlib
    import os

    from bitalloc.quant.stream import known_sha256

    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "0123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sharded.iterdir():
        if path.suffix != ".safetensors":
            (snapshot / path.name).write_bytes(path.read_bytes())
            continue
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(b"not the shard")  # named by the shard's sha256: its bytes are never read
        (snapshot / path.name).symlink_to(blob)
    assert Checkpoint.open(sharded).fingerprint() == Checkpoint.open(snapshot).fingerprint()

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"abcd")
    first = known_sha256(plain)
    assert first == hashlib.sha256(b"abcd").hexdigest()
    stat = plain.stat()
    plain.write_bytes(b"wxyz")  # same size; put the mtime back: the remembered digest stands
    os.utime(plain, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert known_sha256(plain) == first
    os.utime(plain, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert known_sha256(plain) == hashlib.sha256(b"wxyz").hexdigest()


def test_a_streamed_profile_measures_the_kv_units_as_the_whole_model_does(sharded, calibration):
    """``kv_kl`` scores the model with one cache quantized: streamed, the simulated cache rides in
    the keyword arguments each block is handed, and each block's attention writes its layer there."""
    from bitalloc.quant.kv import KVOptions

    formats = parse_formats("int2_g32,int8_g32,bf16")
    short = calibration.head(2, 16)
    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    profiles = [build_profile(m, m.units(kv_cache=True), formats, "output_mse", short, kv=KVOptions(64)) for m in
                (whole, streamed)]
    kv_rows = [i for i, u in enumerate(profiles[0].units) if u.kind != "weight"]
    assert kv_rows and [u.name for u in profiles[1].units] == [u.name for u in profiles[0].units]
    cells = [p.error[kv_rows][:, :2] for p in profiles]  # int2 and int8; bf16 is 0 by definition
    assert np.all(cells[0][:, 0] > 0) and np.all(cells[0][:, 0] > cells[0][:, 1])
    # int8 caches move this random model's KL by 1e-7 or less, where fp32 rounding is of the same size
    np.testing.assert_allclose(cells[1], cells[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cells[1][:, 0], cells[0][:, 0], rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_streamed_build_writes_the_whole_model_s_artifact_block_by_block(sharded, calibration, method, tmp_path):
    """The bitalloc target of a streamed model: one weights file per block (GPTQ's Hessians summed
    from the calibration walking through the unquantized blocks), the same tensors byte for byte."""
    from bitalloc.quant.artifact import build_artifact, load_artifact

    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    allocation = {u.name: ("int3_g32", "int4_g64_asym", "fp8_e4m3")[i % 3] for i, u in enumerate(whole.units().weights)}
    gptq = {"calibration": calibration} if method == "gptq" else {}
    built = [build_artifact(model, allocation, tmp_path / name, method=method, **gptq)
             for model, name in ((whole, "whole"), (streamed, "streamed"))]
    assert built[1].manifest["weights"] == [f"weights-{i:05d}.safetensors" for i in range(1 + len(streamed.blocks))]
    sums = [{name: t["sha256"] for name, t in artifact.manifest["tensors"].items()} for artifact in built]
    assert sums[1] == sums[0]
    assert built[1].manifest["bytes"] == built[0].manifest["bytes"]
    tokens = calibration.inputs[:2]
    logits = [load_artifact(artifact.path).module(tokens).logits.detach() for artifact in built]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


@pytest.mark.parametrize("method, budget", [("rtn", None), ("gptq", None), ("gptq", 0)])
def test_descent_s_kl_gradient_streams_block_by_block_as_the_whole_model_s(sharded, calibration, method, budget,
                                                                            tmp_path, monkeypatch):
    """``KLGradient`` on a streamed model: forward quantized block by block, back down the blocks,
    each block's rows filled while it is read (under GPTQ, each block's Hessians summed from the
    calibration walking beside, and again from its kept states on the way back, spilled or not);
    the whole model's cells within 1e-4."""
    from types import SimpleNamespace

    from bitalloc.quant.evaluate import Evaluator
    from bitalloc.quant.hessian import BlockHessians, calibration_hessians
    from bitalloc.quant.linearize import KLGradient

    monkeypatch.setenv("BITALLOC_SPILL_DIR", str(tmp_path))
    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    streamed.state_budget = budget
    names = [u.name for u in whole.units().weights]
    formats = [f.name for f in FORMATS]
    allocation = SimpleNamespace(formats={name: formats[i % 2] for i, name in enumerate(names)})
    allowed = np.ones((len(names), len(formats)), bool)
    short = calibration.head(4)
    hessians = ([calibration_hessians(whole.module, whole.units(), short), BlockHessians(streamed.units(), short)]
                if method == "gptq" else [None, None])
    cells = [KLGradient(Evaluator(model, calibration.head(3), batch_size=2), names, formats, allowed, method=method,
                        hessians=h)(allocation) for model, h in zip((whole, streamed), hessians)]
    assert np.abs(cells[0]).max() > 0
    np.testing.assert_allclose(cells[1], cells[0], rtol=1e-4, atol=1e-4 * np.abs(cells[0]).max())
    assert not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("metric, options", [("fisher_mse", {"fisher_seed": 5}), ("fisher", None),
                                             ("hessian_trace", {"hutchinson_samples": 2, "hutchinson_seed": 3})])
def test_boundary_states_beyond_the_budget_spill_to_disk_and_give_the_same_cells(sharded, calibration, metric, options,
                                                                                  tmp_path, monkeypatch):
    """With no memory for boundary states, every block's states of a backward walk go to a spill
    file and come back for the reverse walk: the cells are the in-memory walk's, and no file is left."""
    monkeypatch.setenv("BITALLOC_SPILL_DIR", str(tmp_path / "spill"))
    written: list[int] = []
    original = BoundaryStates.append

    def counting(self, states):
        original(self, states)
        written.append(self.spilled)

    monkeypatch.setattr(BoundaryStates, "append", counting)
    short = calibration.head(4, 16)
    cells = []
    for budget in (None, 0):
        streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
        streamed.state_budget = budget
        written.clear()
        cells.append(build_profile(streamed, streamed.units(), FORMATS, metric, short, options=options).error)
        assert (max(written) > 0) == (budget == 0)  # everything spilled, or nothing
    np.testing.assert_array_equal(cells[1], cells[0])
    assert not any((tmp_path / "spill").rglob("*"))


def test_load_within_holds_boundary_states_to_a_share_of_the_memory_cap(sharded):
    streamed = load_within(str(sharded), LoadPolicy(), dtype=torch.float32, device=CPU, max_memory=4 * 2**20)
    assert isinstance(streamed, StreamedModel) and streamed.state_budget == 2**20


@pytest.mark.parametrize("criterion", ["max_activation_variance", "hessian_input_activation", "weight_quantization_error"])
def test_nncf_scores_of_a_streamed_model_are_the_whole_model_s(sharded, calibration, criterion):
    """Each block's statistics gathered as the calibration walks through it, the head's from the
    last hidden states, over the same first samples (a subset smaller than the windows)."""
    from bitalloc.quant.sensitivity import nncf_scores, streamed_nncf_scores

    whole = load_model(str(sharded))
    streamed = open_streamed(sharded, str(sharded), torch.float32, CPU)
    units = whole.units().weights
    batches = calibration.batches(4)
    expected = nncf_scores(whole.module, units, criterion, batches=batches, subset_size=5)
    found = streamed_nncf_scores(streamed, units, batches, criterion, subset_size=5)
    assert found.keys() == expected.keys() and len(set(expected.values())) > 1
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, rel=1e-5), name
