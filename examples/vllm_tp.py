"""A plain tensor-parallel vLLM script: ``llmdiff run`` captures every rank of it from outside.

    llmdiff run -o runs/tp3 --steps all -- python examples/vllm_tp.py MODEL_DIR --tp 3

Each tensor-parallel rank is a Worker process of its own and writes its own folder (``rank0``,
``rank1``, ...), with the parallel layout of its modules (kind, rank, TP size, partition sizes) in its
``process.json``. SmolLM2-135M has 9 attention heads and 3 KV heads: TP=3 works, TP=2 is refused.
Prints the generated texts as one JSON line. ``--fault RANK:PARAMETER:FACTOR`` scales one parameter's shard
in one rank only, before generating (the kind of bug a TP compare must name with its rank).
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
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests batched at most (1: one at a time)")
    p.add_argument("--fault", help="RANK:PARAMETER:FACTOR, e.g. 1:model.layers.3.self_attn.qkv_proj.weight:1.02")
    args = p.parse_args()
    if args.fault:  # the planting function is sent to every worker, which must unpickle it
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=256,
              enable_prefix_caching=False, tensor_parallel_size=args.tp, distributed_executor_backend="mp",
              **({"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}))
    if args.fault:
        from functools import partial

        from llmdiff.testing import scale_on_rank

        rank, parameter, factor = args.fault.split(":")
        applied = llm.apply_model(partial(scale_on_rank, parameter=parameter, factor=float(factor), rank=int(rank)))
        assert sum(applied) == 1, f"--fault {args.fault}: applied in {sum(applied)} ranks"
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=args.tokens))
    print("texts:", json.dumps([o.outputs[0].text for o in outputs]))


if __name__ == "__main__":  # vLLM spawns its workers: the entry point must be guarded
    main()
