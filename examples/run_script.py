"""A plain inference script with no llmdiff in it: ``llmdiff run`` captures it from outside.

    llmdiff run -o runs/fp32 --steps all -- python examples/run_script.py --dtype float32
"""

import argparse

import torch
from models import generate, load

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
p.add_argument("--dtype", default="float32")
p.add_argument("--tokens", type=int, default=16)
args = p.parse_args()
model, ids = load(args.model, getattr(torch, args.dtype))
print(generate(model, ids, args.tokens)[0, ids.shape[1]:].tolist())
