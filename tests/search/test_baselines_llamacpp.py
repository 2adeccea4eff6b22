"""llama.cpp's per-tensor rules against expectations derived by hand from src/llama-quant.cpp.

For n = 30 blocks: n/8 = 3, 7n/8 = 26 (integer division), so use_more_bits holds for
blocks 0-2, 26-29 and where (i - 3) % 3 == 2: 5, 8, ..., 23. n/16 = 1.
SmolLM2's rows: K = 576 for q/k/v/o/gate/up (not a multiple of 256), 1536 for down.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_baselines_common import llama_problem

from bitalloc.search.baselines import GGML_BPW, ModelInfo, UnitInfo, format_table, llamacpp, tensor_type, use_more_bits

UMB_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
SMOL = ModelInfo(n_blocks=30, n_gqa=3, has_output=False)  # 9 heads, 3 KV heads, tied embeddings
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def types_of(ftype: str, fallback: bool, model: ModelInfo = SMOL) -> dict[tuple[str, int], str]:
    problem, infos = llama_problem(n_blocks=model.n_blocks)
    a = llamacpp(problem, infos, ftype, model, fallback=fallback)
    return {(infos[n].kind, infos[n].block): t for n, t in a.info["ggml_types"].items()}


def test_use_more_bits_sets():
    assert {i for i in range(30) if use_more_bits(i, 30)} == UMB_30
    # Llama-7B (32 blocks): 16 layers, the well-known "half of attention.wv and ffn_down" of Q4_K_M
    assert {i for i in range(32) if use_more_bits(i, 32)} == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def test_q4_k_m_plain_rules():
    t = types_of("Q4_K_M", fallback=False)
    for b in range(30):
        assert t["attn_v", b] == ("Q6_K" if b in UMB_30 else "Q4_K")
        assert t["ffn_down", b] == ("Q6_K" if b in UMB_30 else "Q4_K")
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[kind, b] == "Q4_K"


def test_q4_k_m_as_llama_quantize_writes_it_for_576_wide_rows():
    t = types_of("Q4_K_M", fallback=True)
    for b in range(30):
        assert t["attn_v", b] == ("Q8_0" if b in UMB_30 else "Q5_0")  # Q6_K -> Q8_0, Q4_K -> Q5_0
        assert t["ffn_down", b] == ("Q6_K" if b in UMB_30 else "Q4_K")  # 1536 = 6 * 256: k-quants stay
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[kind, b] == "Q5_0"


def test_q3_k_m_plain_and_fallback():
    plain, real = types_of("Q3_K_M", False), types_of("Q3_K_M", True)
    for b in range(30):
        assert plain["attn_v", b] == ("Q5_K" if b < 2 else "Q4_K")
        assert real["attn_v", b] == ("Q5_1" if b < 2 else "Q5_0")
        assert plain["ffn_down", b] == real["ffn_down", b] == ("Q5_K" if b < 1 else "Q4_K")
        assert plain["attn_output", b] == "Q4_K" and real["attn_output", b] == "Q5_0"
        for kind in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            assert plain[kind, b] == "Q3_K" and real[kind, b] == "Q4_0"


@pytest.mark.parametrize(("n_gqa", "attn_v"), [(3, "Q3_K"), (4, "Q4_K")])
def test_q2_k_depends_on_gqa(n_gqa, attn_v):
    model = ModelInfo(n_blocks=30, n_gqa=n_gqa, has_output=False)
    plain, real = types_of("Q2_K", False, model), types_of("Q2_K", True, model)
    for b in range(30):
        assert plain["attn_v", b] == attn_v and real["attn_v", b] == ("Q4_0" if attn_v == "Q3_K" else "Q5_0")
        assert plain["ffn_down", b] == real["ffn_down", b] == "Q3_K"
        assert plain["attn_output", b] == "Q3_K" and real["attn_output", b] == "Q4_0"
        assert plain["attn_q", b] == "Q2_K" and real["attn_q", b] == "Q4_0"


def test_q4_k_s_q5_k_m_q6_k_q3_k_l_q3_k_s():
    s = types_of("Q4_K_S", False)
    assert [b for b in range(30) if s["attn_v", b] == "Q5_K"] == [0, 1, 2, 3]
    assert [b for b in range(30) if s["ffn_down", b] == "Q5_K"] == [0, 1, 2]
    assert types_of("Q4_K_S", True)["attn_v", 0] == "Q5_1"
    m5 = types_of("Q5_K_M", False)
    assert {b for b in range(30) if m5["attn_v", b] == "Q6_K"} == UMB_30
    assert {b for b in range(30) if m5["ffn_down", b] == "Q6_K"} == UMB_30
    assert m5["attn_q", 4] == "Q5_K" and types_of("Q5_K_M", True)["attn_q", 4] == "Q5_1"
    q6 = types_of("Q6_K", True)
    assert {q6[k, b] for k in KINDS if k != "ffn_down" for b in range(30)} == {"Q8_0"}
    assert {q6["ffn_down", b] for b in range(30)} == {"Q6_K"}
    l3 = types_of("Q3_K_L", False)
    assert {l3[k, b] for k in ("attn_v", "ffn_down", "attn_output") for b in range(30)} == {"Q5_K"}
    assert {l3[k, b] for k in ("attn_q", "attn_k", "ffn_gate", "ffn_up") for b in range(30)} == {"Q3_K"}
    assert set(types_of("Q3_K_S", False).values()) == {"Q3_K"}


def test_output_and_tied_embedding_rules():
    tied, untied = ModelInfo(n_blocks=30, has_output=False), ModelInfo(n_blocks=30, has_output=True)
    for ftype in ("Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K"):
        assert tensor_type(UnitInfo(kind="output", row=576), ftype, untied, fallback=False) == "Q8_0"  # 576 % 256
        assert tensor_type(UnitInfo(kind="output", row=4096), ftype, untied) == "Q6_K"
        # a tied token_embd takes the output rule; an untied one keeps the default
        assert tensor_type(UnitInfo(kind="token_embd", row=576), ftype, tied) == "Q8_0"
        assert tensor_type(UnitInfo(kind="token_embd", row=4096), ftype, untied) == {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K",
                                                                                      "Q4_K_M": "Q4_K", "Q6_K": "Q6_K"}[ftype]
    assert tensor_type(UnitInfo(kind="output", row=4096), "Q4_K_M", ModelInfo(n_blocks=30, arch="falcon")) == "Q8_0"


def test_moe_and_70b_and_falcon_branches():
    eight = ModelInfo(n_blocks=32, n_expert=8)
    assert tensor_type(UnitInfo(block=5, kind="attn_v", row=4096), "Q4_K_M", eight) == "Q8_0"
    assert tensor_type(UnitInfo(block=5, kind="attn_k", row=4096), "Q4_K_M", eight) == "Q8_0"
    assert tensor_type(UnitInfo(block=5, kind="attn_output", row=4096), "Q3_K_M", eight) == "Q5_K"
    # MoE kinds match by substring, as llama.cpp's find("ffn_down"); 32 blocks: 6 uses more bits, 5 does not
    assert tensor_type(UnitInfo(block=6, kind="ffn_down_exps", row=14336), "Q4_K_M", eight) == "Q6_K"
    assert tensor_type(UnitInfo(block=5, kind="ffn_down_exps", row=14336), "Q4_K_M", eight) == "Q4_K"
    seventy = ModelInfo(n_blocks=80, n_gqa=8, is_70b=True)
    assert tensor_type(UnitInfo(block=40, kind="attn_v", row=8192), "Q3_K_M", seventy) == "Q5_K"  # Q4_K -> Q5_K
    falcon = ModelInfo(n_blocks=32, arch="falcon")
    assert tensor_type(UnitInfo(block=1, kind="ffn_down", row=4096), "Q4_K_M", falcon) == "Q6_K"  # 1 < 32/16
    assert tensor_type(UnitInfo(block=6, kind="ffn_down", row=4096), "Q4_K_M", falcon) == "Q5_K"
    assert tensor_type(UnitInfo(block=7, kind="ffn_down", row=4096), "Q4_K_M", falcon) == "Q4_K"
    assert tensor_type(UnitInfo(block=7, kind="ffn_down", row=4096), "Q3_K_M", falcon) == "Q3_K"


def test_fallback_to_f16_and_missing_information():
    model = ModelInfo(n_blocks=2)
    assert tensor_type(UnitInfo(block=0, kind="attn_q", row=100), "Q4_K_M", model) == "F16"  # 100 % 32 != 0
    with pytest.raises(ValueError, match="row length"):
        tensor_type(UnitInfo(block=0, kind="attn_q"), "Q4_K_M", model)
    with pytest.raises(ValueError, match="block index"):
        tensor_type(UnitInfo(kind="ffn_down", row=512), "Q4_K_M", model)
    with pytest.raises(ValueError, match="unknown llama.cpp file type"):
        tensor_type(UnitInfo(kind="attn_q", row=512), "Q4_K_XL", model)


def test_ggml_bits_per_weight_from_block_structs():
    assert GGML_BPW == {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q4_0": 4.5,
                        "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "IQ4_NL": 4.5, "F16": 16.0,
                        "BF16": 16.0, "F32": 32.0}


def test_mapping_by_nearest_bits_with_ties_to_the_larger():
    from bitalloc.search import Problem

    # one unit with K = 1536 (whole groups): int{b}_g128 sits at exactly b + 0.125 bits
    widths = (2, 3, 4, 5, 6, 8)
    n, k = 4, 1536
    sizes = [[n * k * b // 8 + n * (k // 128) * 2 for b in widths] + [n * k * 2]]
    problem = Problem(error=np.zeros((1, 7)), bytes=sizes, numel=[n * k], unit_names=["u"],
                      format_names=[f"int{b}_g128" for b in widths] + ["bf16"])
    table = format_table(problem)
    assert table["Q2_K"] == "int3_g128"  # 2.625: 0.5 from int2 (2.125) and int3 (3.125), the larger wins
    assert table["Q3_K"] == "int3_g128"  # 3.4375
    assert table["Q4_K"] == table["Q4_0"] == "int4_g128"  # 4.5: 0.375 below vs 0.625 above
    assert table["Q4_1"] == "int5_g128"  # 5.0
    assert table["Q5_K"] == table["Q5_0"] == "int5_g128"
    assert table["Q5_1"] == "int6_g128"  # 6.0
    assert table["Q6_K"] == "int6_g128"  # 6.5625
    assert table["Q8_0"] == "int8_g128"
    assert table["F16"] == table["BF16"] == "bf16"


def test_allocation_on_the_problem_uses_the_mapping_and_scores_like_any_other():
    problem, infos = llama_problem(n_blocks=30)
    a = llamacpp(problem, infos, "Q4_K_M", SMOL, fallback=True)
    assert a.solver == "llamacpp_Q4_K_M"
    # Q8_0 -> int8, Q5_0 (5.5) -> int5 (5.14), Q6_K (6.56) -> int6, Q4_K (4.5) -> int4 (4.14)
    expected = {"Q8_0": "int8_g128", "Q5_0": "int5_g128", "Q6_K": "int6_g128", "Q4_K": "int4_g128"}
    for name, t in a.info["ggml_types"].items():
        assert a.formats[name] == expected[t]
    rows = np.arange(problem.n_units)
    assert a.error == pytest.approx(problem.error[rows, list(a.choice)].sum())
    plain = llamacpp(problem, infos, "Q4_K_M", SMOL, fallback=False)
    assert plain.solver == "llamacpp_Q4_K_M_plain" and plain.avg_bits < a.avg_bits


def test_candidate_formats_restrict_the_mapping():
    from bitalloc.search import Problem

    n, k = 4, 1536
    names = ["int4_g128", "int4_g128_asym", "int5_g128", "int8_g128"]
    per = {"int4_g128": 4.125, "int4_g128_asym": 4.25, "int5_g128": 5.125, "int8_g128": 8.125}
    sizes = [[int(per[f] * n * k / 8) for f in names]]
    problem = Problem(error=np.zeros((1, 4)), bytes=sizes, numel=[n * k], unit_names=["u"], format_names=names)
    assert format_table(problem)["Q4_0"] == "int4_g128_asym"  # 4.5 is nearer 4.25 than 4.125
    assert format_table(problem, formats=["int4_g128", "int5_g128", "int8_g128"])["Q4_0"] == "int4_g128"
    assert format_table(problem, bpw={"int4_g128_asym": 9.0})["Q4_0"] == "int4_g128"
    infos = {"u": UnitInfo(block=0, kind="attn_q", row=k)}
    a = llamacpp(problem, infos, "Q4_K_M", ModelInfo(n_blocks=1), formats=["int4_g128", "int8_g128"])
    assert a.formats == {"u": "int4_g128"}
    with pytest.raises(ValueError, match="unknown format"):
        llamacpp(problem, infos, "Q4_K_M", ModelInfo(n_blocks=1), formats=["int3_g128"])


def test_an_untied_output_unit_gets_the_output_rule():
    problem, infos = llama_problem(n_blocks=30, lm_head=(49152, 576))
    untied = ModelInfo(n_blocks=30, n_gqa=3, has_output=True)
    for fallback in (True, False):
        a = llamacpp(problem, infos, "Q4_K_M", untied, fallback=fallback)
        assert a.info["ggml_types"]["lm_head"] == "Q8_0" and a.formats["lm_head"] == "int8_g128"
