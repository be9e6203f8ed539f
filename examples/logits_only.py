"""The msIT logits workflow: capture only the logits of every generated token, then find the first
token whose logits leave the budget — with msIT's check (``preset="msit"``: cosine > 0.999, KL < 0.005
for bf16) and with llmdiff's default (KL only: softmax ignores a constant shift, cosine does not).

    python examples/logits_only.py --model smollm2 --tokens 64
"""

from pathlib import Path

import torch
from models import generate, load, parser

import llmdiff

args = parser(__doc__).parse_args()
out = Path(args.out)
for name, dtype in (("logits-fp32", torch.float32), ("logits-bf16", torch.bfloat16)):
    model, ids = load(args.model, dtype)
    with llmdiff.capture(model, out / name, modules=["lm_head"], parts="outputs", steps="all"):
        generate(model, ids, args.tokens)

msit = llmdiff.compare(out / "logits-fp32", out / "logits-bf16", preset="msit", level="token")
for step in msit.tokens.steps:
    print(f"token {step.step}: cosine {step.cosine:.6f} KL {step.kl:.2e} "
          f"top-1 {'same' if not step.flip else 'FLIPPED'}")
print("msIT check, first token out of budget:", msit.tokens.first_out_of_budget)
default = llmdiff.compare(out / "logits-fp32", out / "logits-bf16")
print("llmdiff default, first token out of budget:", default.tokens.first_out_of_budget)
print("first flip:", default.tokens.first_flip)
