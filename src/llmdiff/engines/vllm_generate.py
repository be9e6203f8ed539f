"""Generate with an in-process vLLM engine under capture: the vLLM side of a cross-engine comparison.

Run in the vLLM venv (``make vllm-env``)::

    python -m llmdiff.engines.vllm_generate MODEL_DIR OUT --dtype bfloat16 --tokens 16 \\
        --prompt "The capital of France is" --prompt "Tell me a story"

All prompts are submitted together, so they share batches (continuous batching; ``--chunk N`` caps a
step at N tokens, so long prompts are prefilled in chunks). Every module is captured, full tensors,
every engine step. Prints one JSON line after ``result:``: the generated texts and token ids.
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m llmdiff.engines.vllm_generate")
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--chunk", type=int, help="max_num_batched_tokens")
    parser.add_argument("--modules", action="append", help="capture only these module regexes")
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams

    import llmdiff

    extra = {} if args.chunk is None else {"max_num_batched_tokens": args.chunk}
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512, enable_prefix_caching=False,
              max_num_seqs=max(2, len(args.prompt)), **extra)
    with llmdiff.capture(llm, args.out, steps="all", modules=args.modules):
        outputs = llm.generate(args.prompt, SamplingParams(temperature=0, max_tokens=args.tokens), use_tqdm=False)
    print("result:", json.dumps({"texts": [o.outputs[0].text for o in outputs],
                                 "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}), flush=True)


if __name__ == "__main__":
    main()
