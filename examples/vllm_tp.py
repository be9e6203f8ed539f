"""A plain tensor-parallel vLLM script: ``llmdiff run`` captures every rank of it from outside.

    llmdiff run -o runs/tp3 --steps all -- python examples/vllm_tp.py MODEL_DIR --tp 3

Each tensor-parallel rank is a Worker process of its own and writes its own folder (``rank0``,
``rank1``, ...), with the parallel layout of its modules (kind, rank, TP size, partition sizes) in its
``process.json``. SmolLM2-135M has 9 attention heads and 3 KV heads: TP=3 works, TP=2 is refused.
Prints the generated texts as one JSON line.
"""

import argparse
import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # 3 workers on one NUMA node of 2 cores

PROMPTS = ["The capital of France is", "Tell me a story about a dragon who lived in a cave by the sea"]


def main() -> None:
    from vllm import LLM, SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=4)
    args = p.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=256,
              enable_prefix_caching=False, tensor_parallel_size=args.tp, distributed_executor_backend="mp")
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=args.tokens))
    print("texts:", json.dumps([o.outputs[0].text for o in outputs]))


if __name__ == "__main__":  # vLLM spawns its workers: the entry point must be guarded
    main()
