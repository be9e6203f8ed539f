"""Capture a Hugging Face ``generate`` with the Python API, in float32 and bfloat16, then compare.

    python examples/hf_generate.py --model smollm2 --out runs
"""

from pathlib import Path

import torch
from models import generate, load, parser

import llmdiff

args = parser(__doc__).parse_args()
out = Path(args.out)
llmdiff.seed_all(1234, deterministic=True)
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    model, ids = load(args.model, dtype)
    # every module, every generated token; tensors of decoder blocks only would be modules=[r"layers\.\d+$"]
    with llmdiff.capture(model, out / name, steps="all"):
        generate(model, ids, args.tokens)

report = llmdiff.compare(out / "fp32", out / "bf16")
print("verdict:", report.verdict)
print("first divergence:", report.first_divergence and report.first_divergence["name"])
print("top culprit:", report.culprits[0].module if report.culprits else None)
report.to_html(out / "report.html")
print("report:", out / "report.html")
