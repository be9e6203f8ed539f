"""Capture overhead on a real vLLM engine: no capture vs statistics vs full tensors, same engine, same run.

    VLLM_VENV/bin/python bench/vllm_overhead.py MODEL_DIR [--tokens 32] [--reps 3] [--prompts 4]

Runs in the vLLM venv (``make vllm-env``), in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so one
``vllm.LLM`` serves every repetition. Each repetition times ``llm.generate`` of several prompts at
temperature 0 with ``min_tokens = max_tokens`` (every run does the same work), interleaving the modes;
captures hook every module of the model at every engine step. Prints medians and ratios to no capture.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmdiff import capture, open_dump

PROMPTS = ["The capital of France is", "Tell me a story about a dragon who lived in a cave by the sea",
           "Explain in simple words how a refrigerator keeps food cold", "Write a haiku about autumn leaves"]
MODES = {"none": None, "stats": "stats", "tensor": "tensor"}


def main() -> None:
    from vllm import LLM, SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, min_tokens=args.tokens)
    prompts = PROMPTS[:args.prompts]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    work = Path(tempfile.mkdtemp(prefix="llmdiff-vllm-bench-"))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    sizes: dict[str, tuple[int, int, int]] = {}
    try:
        for rep in range(args.reps):
            for mode, capture_mode in MODES.items():
                run_dir = work / f"{mode}-{rep}"
                start = time.perf_counter()
                if capture_mode is None:
                    llm.generate(prompts, params, use_tqdm=False)
                else:
                    with capture(llm, run_dir, steps="all", mode=capture_mode):
                        llm.generate(prompts, params, use_tqdm=False)
                times[mode].append(time.perf_counter() - start)
                if capture_mode is not None:
                    dump = open_dump(run_dir)
                    files = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
                    sizes[mode] = (len(dump.steps), len(dump.entries), files)
                    shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["none"])
    print(f"vLLM capture overhead, {os.cpu_count()} CPUs, {len(prompts)} prompts x {args.tokens} tokens, "
          f"{args.dtype}, every module, every engine step, median of {args.reps}")
    for mode in MODES:
        median = statistics.median(times[mode])
        line = f"  {mode:7s} {median:7.2f} s  {median / base:5.2f}x no capture"
        if mode in sizes:
            steps, entries, files = sizes[mode]
            line += f"  ({steps} steps, {entries} entries, {files / 2**20:.1f} MB on disk)"
        print(line)


if __name__ == "__main__":
    main()
