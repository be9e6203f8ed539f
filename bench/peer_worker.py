"""One measured run of one capture tool, in its own process (msProbe's debugger and msIT's DumpConfig
are process-wide singletons). Run by bench/run.py, in the peers' venv for msprobe/msit.

    python peer_worker.py TOOL MODE MODEL_DIR OUT_DIR --tokens 32 --threads 2 --dtype float32

TOOL: none | llmdiff | msprobe | msit; MODE: stats | tensor. Prints one JSON line: seconds of a
generate call without capture and with it (the same process, after a warm-up), bytes written.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("tool", choices=["none", "llmdiff", "msprobe", "msit"])
    p.add_argument("mode", choices=["stats", "tensor"])
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    enc = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = enc if isinstance(enc, torch.Tensor) else enc["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    timed_generate(model, ids, 2)  # warm-up
    baseline = timed_generate(model, ids, args.tokens)
    start = time.perf_counter()
    if args.tool == "llmdiff":
        import llmdiff

        with llmdiff.capture(model, out, steps="all", mode=args.mode):
            timed_generate(model, ids, args.tokens)
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
        timed_generate(model, ids, args.tokens)
        debugger.stop()
        debugger.step()
    elif args.tool == "msit":
        from msit_llm import DumpConfig, register_hook

        if args.mode != "tensor":
            raise SystemExit("msIT's torch dump has no statistics-only mode in this benchmark")
        register_hook(model, DumpConfig(dump_path=str(out), token_range=list(range(args.tokens + 1))))
        timed_generate(model, ids, args.tokens)
    else:
        timed_generate(model, ids, args.tokens)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    print(json.dumps({"tool": args.tool, "mode": args.mode, "none_s": baseline, "tool_s": seconds, "bytes": size,
                      "steps": args.tokens}))


if __name__ == "__main__":
    main()
