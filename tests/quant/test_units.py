import torch
from torch import nn

from bitalloc.quant.units import enumerate_units, set_weight_matrix, sibling_groups, weight_matrix


def test_llama_units_blocks_and_tie_groups_from_shared_inputs(tiny_llama):
    units = enumerate_units(tiny_llama.module, example_inputs=tiny_llama.example_inputs, kv_cache=True)
    weights = units.weights
    config = tiny_llama.module.config
    assert len(weights) == 7 * config.num_hidden_layers
    assert not any("embed" in u.name or "lm_head" in u.name for u in weights)
    q = next(u for u in weights if u.name.endswith("layers.1.self_attn.q_proj"))
    assert q.block == 1 and q.shape == (64, 64) and q.numel == 64 * 64
    assert sorted(map(sorted, units.tie_groups)) == sorted(
        sorted(f"model.layers.{i}.{leaf}" for leaf in leaves)
        for i in range(2)
        for leaves in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    )
    kv = [u for u in units.units if u.kind != "weight"]
    assert len(kv) == 2 * config.num_hidden_layers
    assert all(u.bytes_per_token == 2 * 16 * 2 for u in kv)  # kv_heads * head_dim * 2 bytes


def test_name_fallback_agrees_with_the_forward_pass(tiny_llama):
    by_forward = enumerate_units(tiny_llama.module, example_inputs=tiny_llama.example_inputs)
    by_name = enumerate_units(tiny_llama.module)
    assert sorted(map(sorted, by_forward.tie_groups)) == sorted(map(sorted, by_name.tie_groups))


def test_cnn_units_are_conv_and_linear_with_no_ties_or_kv(digits_cnn):
    units = enumerate_units(digits_cnn.module, example_inputs=digits_cnn.example_inputs, kv_cache=True)
    assert [u.shape for u in units.units] == [(16, 9), (32, 144), (64, 512), (10, 64)]
    assert units.tie_groups == []
    assert all(u.kind == "weight" for u in units.units)


def test_branches_reading_one_input_are_tied_even_with_unknown_names():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right, self.after = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.after(self.left(x) + self.right(x))

    units = enumerate_units(TwoHeads(), example_inputs=(torch.zeros(1, 4),))
    assert units.tie_groups == [["left", "right"]]
    assert sibling_groups(units.names()) == []


def test_include_and_exclude_patterns(tiny_llama):
    units = enumerate_units(tiny_llama.module, include=["*mlp*"])
    assert len(units) == 6 and all(".mlp." in u.name for u in units.units)
    everything = enumerate_units(tiny_llama.module, exclude=())
    assert any(u.name == "lm_head" for u in everything.units)


def test_weight_matrix_round_trip_for_conv():
    conv = nn.Conv2d(3, 5, 3)
    matrix = weight_matrix(conv).clone()
    assert matrix.shape == (5, 27)
    set_weight_matrix(conv, matrix * 2)
    assert torch.allclose(weight_matrix(conv), matrix * 2)
