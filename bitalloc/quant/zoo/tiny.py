"""A tiny random Llama for fast structural tests (``factory:tiny-llama``).

Two layers, grouped-query attention and the SmolLM2 tokenizer, initialised with a fixed
seed. Its weights are random: use it for shapes, plumbing and exactness checks, never for
quality claims (those run on the real SmolLM2).
"""

from __future__ import annotations

import torch

from bitalloc.quant.loading import LoadedModel


def load_tiny_llama() -> LoadedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitalloc.quant.zoo import zoo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llm"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    example = {"input_ids": torch.arange(2, 18).unsqueeze(0)}
    return LoadedModel("factory:tiny-llama", model, tokenizer, example, {"architecture": "LlamaForCausalLM"})
