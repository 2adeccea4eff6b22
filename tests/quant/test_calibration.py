import json

import pytest
import torch

from bitalloc.quant.calibration import calibration_tokens, evaluation_tokens, load_texts


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "first"}) + "\n\n" + json.dumps({"content": "second"}) + "\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["one document"]
    assert load_texts(f"{tmp_path / 'b.jsonl'}#content") == ["first", "second"]


def test_bad_sources_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no text field 'text'"):
        load_texts(str(tmp_path / "nofield.jsonl"))


def test_calibration_windows_are_seeded_and_sized(tiny_llama):
    tok = tiny_llama.tokenizer
    a = calibration_tokens(tok, "zoo:calibration", seq_len=64, count=5, seed=1)
    b = calibration_tokens(tok, "zoo:calibration", seq_len=64, count=5, seed=1)
    c = calibration_tokens(tok, "zoo:calibration", seq_len=64, count=5, seed=2)
    assert a.inputs.shape == (5, 64)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    assert a.sha256 == c.sha256 and len(a.sha256) == 64


def test_evaluation_windows_do_not_overlap(tmp_path, tiny_llama):
    text = " ".join(f"word{i}" for i in range(3000))
    (tmp_path / "t.txt").write_text(text)
    windows = evaluation_tokens(tiny_llama.tokenizer, str(tmp_path / "t.txt"), seq_len=50)
    flat = windows.inputs.flatten()
    stream = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert flat.tolist() == stream[: len(flat)]
    few = evaluation_tokens(tiny_llama.tokenizer, str(tmp_path / "t.txt"), seq_len=50, max_windows=3)
    assert few.inputs.shape == (3, 50)


def test_reference_splits_are_disjoint_and_cover_every_document(zoo):
    from bitalloc.quant.zoo.corpus import SPLITS, split_path

    docs = {s: [json.loads(l) for l in split_path(s).read_text().splitlines()] for s in SPLITS}
    ids = {s: {(d["source"], d["id"]) for d in v} for s, v in docs.items()}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values()))  # no document in two splits
    assert all(d["source"] == "sotu" and d["year"] <= 1949 for d in docs["calibration"])
    for d in docs["evaluation"]:
        assert (d["source"] == "sotu" and 1950 <= d["year"] <= 1989) or (d["source"] == "moby-dick" and d["chapter"] <= 100)
    for d in docs["tuning"]:
        assert (d["source"] == "sotu" and d["year"] >= 1990) or (d["source"] == "moby-dick" and d["chapter"] > 100)
    assert sum(d["source"] == "moby-dick" for d in docs["evaluation"]) == 100
    assert {d["source"] for d in docs["tuning"]} == {"sotu", "moby-dick"}  # both kinds of text, like the evaluation
    texts = {s: {d["text"] for d in v} for s, v in docs.items()}
    assert not texts["calibration"] & texts["evaluation"] and not texts["tuning"] & texts["evaluation"]


def test_shared_documents_between_sources(tmp_path, zoo):
    from bitalloc.quant.calibration import shared_documents

    (tmp_path / "a.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "beta"}\n{"text": "gamma"}\n')
    assert shared_documents(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")) == 1
    assert shared_documents("zoo:calibration", "zoo:evaluation") == 0
    assert shared_documents("zoo:tuning", "zoo:evaluation") == 0


def test_a_registered_text_source_is_named_by_its_scheme(monkeypatch, zoo):
    from bitalloc.quant import calibration

    monkeypatch.setitem(calibration._TEXT_SOURCES, "memo", lambda name: [f"{name} one", f"{name} two"])
    assert calibration.load_texts("memo:notes") == ["notes one", "notes two"]
    assert calibration.load_texts("zoo:tuning")  # the zoo registers its splits through the plugin entry point


def test_an_unknown_tensor_source_names_the_registered_schemes(tmp_path):
    from bitalloc.quant.calibration import tensor_samples

    with pytest.raises(ValueError, match=r"expected an existing \.safetensors file or zoo:NAME"):
        tensor_samples(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="the zoo's is zoo:digits"):
        tensor_samples("zoo:faces")
