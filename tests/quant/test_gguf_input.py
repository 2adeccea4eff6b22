"""A .gguf model streams: converted tensor by tensor into safetensors shards (once per file), and
profiled block by block to the cells of the GGUF loaded whole by transformers."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from bitalloc.quant import gguf_input
from bitalloc.quant.calibration import calibration_for
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.llamacpp import tools as llamacpp_tools
from bitalloc.quant.loading import LoadPolicy, ModelLoadError
from bitalloc.quant.profile import build_profile
from bitalloc.quant.stream import StreamedModel, load_within

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_gguf(zoo, tmp_path_factory):
    """A random Llama written as an f16 GGUF by llama.cpp's own converter."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitalloc.quant.zoo import zoo_model_dir

    built = llamacpp_tools.find()
    if built is None:
        pytest.skip(f"llama.cpp's tools are not built in {llamacpp_tools.install_dir()}: run `bitalloc llamacpp build`")
    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llm"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    out = folder / "model-f16.gguf"
    done = subprocess.run(built.convert_command(folder / "hf", out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_a_gguf_streams_converted_once_and_profiles_as_the_file_loaded_whole(llama_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_GGUF_DIR", str(tmp_path / "converted"))
    monkeypatch.setattr(gguf_input, "SHARD_BYTES", 1 << 20)  # several shards even for a tiny model
    policy = LoadPolicy(model_roots=(llama_gguf.parent,))
    whole = load_within(str(llama_gguf), policy, dtype=torch.float32, device=CPU)
    streamed = load_within(str(llama_gguf), policy, dtype=torch.float32, device=CPU, max_memory=1 << 20)
    assert not isinstance(whole, StreamedModel) and isinstance(streamed, StreamedModel)
    assert "converted from GGUF" in streamed.info["streamed"]
    (folder,) = (tmp_path / "converted").iterdir()
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / gguf_input.INDEX).exists()
    written = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = load_within(str(llama_gguf), policy, dtype=torch.float32, device=CPU, stream=True)
    assert isinstance(again, StreamedModel) and {p: p.stat().st_mtime_ns for p in folder.iterdir()} == written

    formats = parse_formats("int2_g32,int4_g32,int8_g32")
    calibration = calibration_for(whole, None, seq_len=32, count=4)
    cells = [build_profile(m, m.units(), formats, "output_mse", calibration).error for m in (whole, streamed)]
    assert (cells[0][:, 0] > 0).all()
    np.testing.assert_allclose(cells[1], cells[0], rtol=1e-4, atol=1e-12)


def test_a_file_that_is_not_a_gguf_model_is_refused_clearly(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelLoadError, match="could not read .*bogus.gguf as a GGUF model"):
        gguf_input.convert(bogus, tmp_path / "out", torch.float32)
    assert not (tmp_path / "out").exists()
