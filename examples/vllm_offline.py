"""A plain vLLM script with no llmdiff in it: ``llmdiff run`` captures the engine from outside.

    llmdiff run -o runs/vllm --steps all -- python examples/vllm_offline.py MODEL_DIR
    VLLM_ENABLE_V1_MULTIPROCESSING=0 llmdiff run -c il.json -- python examples/vllm_offline.py MODEL_DIR

Several prompts of different lengths are served in the same batches; ``--chunk N`` caps the tokens
of one step (``max_num_batched_tokens``) so long prompts are prefilled in chunks. Prints the
generated texts as one JSON line.
"""

import argparse
import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["The capital of France is", "Tell me a story about a dragon who lived in a cave by the sea"]


def main() -> None:
    from vllm import LLM, SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--chunk", type=int, help="max_num_batched_tokens: prefill long prompts in chunks")
    args = p.parse_args()
    extra = {} if args.chunk is None else {"max_num_batched_tokens": args.chunk, "max_num_seqs": 2}
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512,
              enable_prefix_caching=False, **extra)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=args.tokens))
    print("texts:", json.dumps([o.outputs[0].text for o in outputs]))


if __name__ == "__main__":  # vLLM spawns its engine processes: the entry point must be guarded
    main()
