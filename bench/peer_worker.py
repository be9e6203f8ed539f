"""One measured run of one capture tool, in its own process (msProbe's debugger and msIT's DumpConfig
are process-wide singletons). Run by bench/run.py, in the peers' venv for msprobe/msit.

    python peer_worker.py TOOL MODE MODEL_DIR OUT_DIR --tokens 32 --threads 2 --dtype float32 [--level op]
    python peer_worker.py TOOL MODE - OUT_DIR --workload prefill --threads 1

TOOL: none | llmdiff | msprobe | msit; MODE: stats | tensor. Prints one JSON line: seconds of the workload
without capture and with it (the same process, after a warm-up), bytes written. Workloads: ``decode`` is
one ``generate`` call of MODEL_DIR (prefill + N tokens); ``prefill`` is msProbe's own benchmark shape, a
randomly initialised transformers Llama (hidden 512, 8 layers), 10 forward passes of a 128-token prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "What is the capital of France? Describe it in detail."


def timed_generate(model, ids, tokens: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def prefill_model():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000)
    return LlamaForCausalLM(config).eval(), torch.randint(0, 32000, (1, 128))


def timed_passes(model, ids, passes: int = 10) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(passes):
            model(ids)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tool", choices=["none", "llmdiff", "msprobe", "msit"])
    p.add_argument("mode", choices=["stats", "tensor"])
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--level", default="module", choices=["module", "op"], help="llmdiff only")
    p.add_argument("--workload", default="decode", choices=["decode", "prefill"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.workload == "prefill":
        model, ids = prefill_model()

        def workload() -> float:
            return timed_passes(model, ids)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        enc = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = enc if isinstance(enc, torch.Tensor) else enc["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()

        def workload() -> float:
            return timed_generate(model, ids, args.tokens)
    workload()  # warm-up
    baseline = workload()
    if args.tool == "llmdiff":
        from llmdiff import capture  # imported before the clock starts, as msProbe's debugger is
    start = time.perf_counter()
    if args.tool == "llmdiff":
        with capture(model, out, steps="all", mode=args.mode, level=args.level):
            workload()
    elif args.tool == "msprobe":
        from msprobe.pytorch import PrecisionDebugger

        task = "statistics" if args.mode == "stats" else "tensor"
        config = {"task": task, "dump_path": str(out), "rank": [], "step": [], "level": "L0", "async_dump": False,
                  task: {"scope": [], "list": [], "data_mode": ["all"], "summary_mode": "statistics"}}
        config_file = out.with_name(out.name + "-config.json")
        config_file.write_text(json.dumps(config))
        start = time.perf_counter()
        debugger = PrecisionDebugger(config_path=str(config_file))
        debugger.start(model=model)
        workload()
        debugger.stop()
        debugger.step()
    elif args.tool == "msit":
        from msit_llm import DumpConfig, register_hook

        if args.mode != "tensor":
            raise SystemExit("msIT's torch dump has no statistics-only mode in this benchmark")
        register_hook(model, DumpConfig(dump_path=str(out), token_range=list(range(args.tokens + 1))))
        workload()
    else:
        workload()
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    print(json.dumps({"tool": args.tool, "mode": args.mode, "none_s": baseline, "tool_s": seconds, "bytes": size,
                      "steps": args.tokens}))


if __name__ == "__main__":
    main()
