"""Tiny models for tests and examples, built from configs with fixed seeds (nothing is downloaded)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> torch.nn.Module:
    """A 2-layer LlamaForCausalLM with random weights, identical for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 4) -> torch.Tensor:
    """Greedy generation, deterministic."""
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,  # type: ignore[operator]
                              min_new_tokens=new_tokens)
