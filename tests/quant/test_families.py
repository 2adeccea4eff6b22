"""Model families as their own runtimes run them, tested by config, never by name.

Random-weight models built from transformers configs (Llama, Qwen2, Mistral, Gemma-3), saved as
a user's checkpoint folder and loaded through ``load_model``: they test the mechanics of each
architecture (which tokens start a window, which layers slide, whether the whole job runs),
never quality.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from bitalloc.pipeline import JobSpec, run_job
from bitalloc.quant.artifact import build_artifact, load_artifact
from bitalloc.quant.calibration import calibration_tokens, evaluation_tokens, sequence_prefix
from bitalloc.quant.costs import unit_bytes
from bitalloc.quant.export import export_allocation
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.loading import load_model
from bitalloc.quant.units import enumerate_units
from bitalloc.search import Budgets

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256)
FAMILIES = {
    # name: (config class, its options, whether the tokenizer starts a sequence with BOS, each layer's window)
    "llama": ("LlamaConfig", dict(num_hidden_layers=2), True, [None, None]),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2), False, [None, None]),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=24), True, [24, 24]),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=3, sliding_window=24, query_pre_attn_scalar=16,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
               True, [24, 24, None]),
}
ARCHITECTURES = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
                 "MistralConfig": "MistralForCausalLM", "Gemma3TextConfig": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, zoo, tmp_path_factory):
    """(name, checkpoint folder, adds BOS, windows): a random model of the family, saved as a user would."""
    import transformers
    from transformers import AutoTokenizer

    from bitalloc.quant.zoo import zoo_model_dir

    name = request.param
    config_name, options, adds_bos, windows = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llm"))
    if adds_bos:
        bos = tokenizer.bos_token
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                                                **SMALL, **options)
    torch.manual_seed(0)
    model = getattr(transformers, ARCHITECTURES[config_name])(config)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return name, folder, adds_bos, windows


def test_windows_start_with_bos_exactly_when_the_tokenizer_adds_it(family):
    name, folder, adds_bos, _ = family
    tokenizer = load_model(str(folder)).tokenizer
    bos = tokenizer.bos_token_id
    assert sequence_prefix(tokenizer) == ((bos,) if adds_bos else ())
    calibration = calibration_tokens(tokenizer, "zoo:calibration", seq_len=16, count=4)
    evaluation = evaluation_tokens(tokenizer, "zoo:evaluation", seq_len=16, max_windows=4)
    for windows in (calibration, evaluation):
        assert windows.inputs.shape[1] == 16
        assert bool((windows.inputs[:, 0] == bos).all()) == adds_bos, name
        assert not bool((windows.inputs[:, 1:] == bos).any())  # only the text follows
        assert windows.describe()["prefix"] == ([bos] if adds_bos else [])
    # A job can override the tokenizer's choice either way; the text after the prefix is the same.
    never = calibration_tokens(tokenizer, "zoo:calibration", seq_len=16, count=4, bos=False)
    always = calibration_tokens(tokenizer, "zoo:calibration", seq_len=16, count=4, bos=True)
    assert not bool((never.inputs[:, 0] == bos).all()) and bool((always.inputs[:, 0] == bos).all())
    assert never.describe()["inputs_sha256"] != always.describe()["inputs_sha256"]


def test_kv_bytes_follow_each_layers_window(family):
    name, folder, _, windows = family
    units = enumerate_units(load_model(str(folder)).module, kv_cache=True).units
    caches = [u for u in units if u.kind != "weight"]
    assert [u.window for u in caches if u.kind == "kv_key"] == windows, name
    keep = get_format("bf16")
    for unit in caches:
        held = 8192 if unit.window is None else unit.window  # a sliding layer keeps its window, whatever the context
        assert unit_bytes(unit, keep, context=8192) == unit.bytes_per_token * held
        assert unit_bytes(unit, keep, context=16) == unit.bytes_per_token * 16  # shorter than every window


@pytest.mark.slow
def test_the_whole_job_runs_on_each_family(family, tmp_path):
    name, folder, _, windows = family
    spec = JobSpec(model=str(folder), formats=["int4_g32", "int8_g32", "bf16"], budgets=Budgets(max_avg_bits=7.0),
                   points=4, seq_len=32, samples=4, eval_windows=2, kv=KVOptions(context=64))
    result = run_job(spec, profile_dir=tmp_path / "profiles")
    chosen = result.chosen
    assert chosen is not None and chosen.avg_bits <= 7.0 and len(result.front) >= 2
    assert result.evaluation["kl"] >= 0 and result.evaluation["tokens"] > 0
    assert result.profile.meta["calibration"]["prefix"] == ([] if name == "qwen2" else [1])
    profile = result.profile
    exported = json.loads(export_allocation("json", chosen.formats, profile.units, profile.tie_groups, {},
                                            kv=KVOptions(context=64)).data)
    contexts = {u["name"]: u.get("context") for u in exported["units"]}
    assert [contexts[f"kv.{i}.key"] for i in range(len(windows))] == [64 if w is None else min(64, w) for w in windows]

    loaded = load_model(str(folder))
    weights = {u.name: chosen.formats[u.name] for u in profile.units if u.kind == "weight"}
    build_artifact(loaded, weights, tmp_path / "artifact")
    model = load_artifact(tmp_path / "artifact").module
    ids = loaded.tokenizer("The state of the union", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
