import json
from pathlib import Path

import pytest
import torch

from bitalloc.quant.loading import LoadPolicy, ModelLoadError, load_model


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_directory_without_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(str(tmp_path))


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(tmp_path))


def test_paths_outside_the_model_roots_are_refused(tmp_path, zoo):
    from bitalloc.quant.zoo import asset_dir

    policy = LoadPolicy(model_roots=(tmp_path,))
    with pytest.raises(ModelLoadError, match="outside the configured model roots"):
        load_model(str(asset_dir("cnn")), policy)


def test_unknown_specs_and_factories(zoo):
    with pytest.raises(ModelLoadError, match="unknown factory"):
        load_model("factory:nope")
    with pytest.raises(ModelLoadError, match="neither a path"):
        load_model("not a spec at all")
    with pytest.raises(ModelLoadError, match="zoo"):
        load_model("zoo:text")


def test_reference_llm_loads_like_a_hub_model(smollm2):
    from bitalloc.quant.zoo import asset_dir

    assert smollm2.is_causal_lm
    assert type(smollm2.module).__name__ == "LlamaForCausalLM"
    assert not hasattr(smollm2.module.config, "quantization_config")
    assert Path(asset_dir("llm"), "model.safetensors").exists()
    ids = smollm2.tokenizer("The United States of America", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = smollm2.module(ids, labels=ids).loss
    assert float(loss.exp()) < 1000  # a trained model, far from uniform over 49k tokens


def test_cnn_directory_loads_as_a_plain_module(digits_cnn, zoo):
    from bitalloc.quant.zoo.digits import accuracy, digits_split

    _, _, x_test, y_test = digits_split()
    assert not digits_cnn.is_causal_lm
    assert accuracy(digits_cnn.module, x_test, y_test) == pytest.approx(zoo["cnn"]["test_accuracy"], abs=1e-4)
