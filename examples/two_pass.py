"""Stats first, tensors where it matters: a cheap statistics-only pass over every module finds the
suspicious layer; a second pass dumps full tensors of that layer only.

    python examples/two_pass.py --model smollm2
"""

import re
from pathlib import Path

import torch
from models import generate, load, parser

import llmdiff

args = parser(__doc__).parse_args()
out = Path(args.out)


def run(name, dtype, **options):
    model, ids = load(args.model, dtype)
    if dtype == torch.bfloat16:  # a planted fault to find: layer 1's MLP output is off by 5%
        model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: o * 1.05)
    with llmdiff.capture(model, out / name, steps="all", **options):
        generate(model, ids, args.tokens)


# pass 1: statistics of every module (a few hundred bytes per tensor)
run("stats-fp32", torch.float32, mode="stats")
run("stats-bf16", torch.bfloat16, mode="stats")
first = llmdiff.compare(out / "stats-fp32", out / "stats-bf16")
# Statistics can point (norms that drift) but not prove (differences can cancel in a norm): their
# culprits are suspects, to be confirmed with tensors.
suspect = first.culprits[0].module if first.culprits else first.first_divergence["module"]
layer = re.match(r"(model\.layers\.\d+)", suspect).group(1)
print(f"pass 1 (stats): verdict {first.verdict}, suspect {suspect}")

# pass 2: full tensors of that layer only
run("tensor-fp32", torch.float32, modules=[re.escape(layer) + r"\."])
run("tensor-bf16", torch.bfloat16, modules=[re.escape(layer) + r"\."])
second = llmdiff.compare(out / "tensor-fp32", out / "tensor-bf16")
print(f"pass 2 (tensors of {layer}): verdict {second.verdict}, culprit {second.culprits[0].module}")
