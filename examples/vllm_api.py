"""The Python API on an in-process vLLM engine: ``llmdiff.capture(llm, ...)`` hooks the engine's model.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python examples/vllm_api.py MODEL_DIR --out runs/vllm-api

Generates once without capture and once with it (statistics of every module plus the torch ops
inside layer 0's MLP, engine steps 0-2), checks the texts are equal, and prints what was captured.
"""

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model must live in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import llmdiff

PROMPTS = ["The capital of France is", "Tell me a story about a dragon who lived in a cave by the sea"]


def main() -> None:
    from vllm import LLM, SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--out", default="runs/vllm-api")
    p.add_argument("--tokens", type=int, default=6)
    args = p.parse_args()
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=512, enable_prefix_caching=False,
              max_num_batched_tokens=16, max_num_seqs=2)  # 16 tokens a step: the long prompt is chunked
    params = SamplingParams(temperature=0, max_tokens=args.tokens)
    plain = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    with llmdiff.capture(llm, args.out, mode="stats", steps="0-2", level="mix", ops_allow=["silu", "mul"],
                         modules=[r"^model\.layers\.\d+$", r"^model\.layers\.0\.mlp", r"^logits_processor$"]):
        captured = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    assert captured == plain, (captured, plain)
    dump = llmdiff.open_dump(args.out)
    for step in dump.steps:
        rows = [(r["id"].split("-")[0], r["start"], r["rows"], r["computed"]) for r in step.requests or []]
        print(f"step {step.step}: {step.entries} entries; requests (id, first row, rows, computed before): {rows}")
    print("result:", json.dumps({"texts": captured, "steps": len(dump.steps), "entries": len(dump.entries)}))


if __name__ == "__main__":
    main()
