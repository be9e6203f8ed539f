"""A client for a vLLM server on loopback: waits until it is up, sends OpenAI completions at temperature 0.

    llmdiff run -c il.json -o runs/served -- python -m vllm.entrypoints.openai.api_server \\
        --model MODEL_DIR --enforce-eager --no-async-scheduling --port 8000 &
    python examples/vllm_client.py 8000 MODEL_DIR; kill -INT %1

Prints the generated texts as one JSON line after "texts:". Standard library only.
"""

import json
import sys
import time
import urllib.request

PROMPTS = ["The capital of France is", "Tell me a story about a dragon who lived in a cave by the sea"]


def main() -> None:
    port, model = int(sys.argv[1]), sys.argv[2]
    wait = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"no server on {base} after {wait:.0f} s")
            time.sleep(1)
    texts = []
    for prompt in PROMPTS:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            texts.append(json.load(response)["choices"][0]["text"])
    print("texts:", json.dumps(texts))


if __name__ == "__main__":
    main()
