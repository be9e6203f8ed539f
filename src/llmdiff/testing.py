"""Small models for tests, examples and trying llmdiff out: built from configs, nothing downloaded."""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> Any:
    """A small ``LlamaForCausalLM`` (vocab 128, hidden 64) with random weights, the same for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def generate(model: Any, prompt: torch.Tensor, new_tokens: int = 4) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens, without gradients."""
    with torch.no_grad():
        out: torch.Tensor = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False)
    return out


def scale_on_rank(model: Any, parameter: str, factor: float, rank: int) -> bool:
    """Multiply ``parameter`` of ``model`` by ``factor`` in the tensor-parallel rank ``rank`` only (a fault on
    one rank, for ``llm.apply_model``); True where it was applied.

    vLLM's CPU build packs a linear layer's weight for its GEMM kernel at load time and drops the
    parameter, so there the packed kernel is wrapped instead: ``linear(x, c*W, b) = c*(linear(x, W, b) - b) + b``.
    """
    from vllm.distributed import parallel_state

    if parallel_state.get_tensor_model_parallel_rank() != rank:
        return False
    owner_name, _, leaf = parameter.rpartition(".")
    owner = model.get_submodule(owner_name)
    kernel = getattr(owner, "cpu_linear", None)
    if leaf == "weight" and callable(kernel):
        def scaled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = kernel(x, weight, bias)
            return out * factor if bias is None else (out - bias) * factor + bias

        owner.cpu_linear = scaled
        return True
    with torch.no_grad():
        getattr(owner, leaf).mul_(factor)
    return True
