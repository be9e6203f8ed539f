"""Scripts written for msProbe and msIT, run on llmdiff by changing one import each, then compared.

    python examples/seed_tools.py --model tiny
"""

import json
from pathlib import Path

import torch
from models import generate, load, parser

import llmdiff
from llmdiff.compat.msit import DumpConfig, register_hook
from llmdiff.compat.msprobe import PrecisionDebugger, seed_all  # was: from msprobe.pytorch import ...

args = parser(__doc__).parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# An msProbe config.json, unchanged: statistics of every module, forward passes of debugger step 0.
config = {"task": "statistics", "dump_path": str(out / "msprobe_fp32"), "rank": [], "step": [0], "level": "L0",
          "async_dump": False, "statistics": {"scope": [], "list": [], "data_mode": ["all"],
                                              "summary_mode": "statistics"}}
(out / "config.json").write_text(json.dumps(config))
seed_all(seed=1234, mode=True)
model, ids = load(args.model, torch.float32)
debugger = PrecisionDebugger(config_path=out / "config.json")
debugger.start(model=model)
generate(model, ids, args.tokens)
debugger.stop()
debugger.step()
debugger.close()

# An msIT dump of the bf16 run (was: from msit_llm import DumpConfig, register_hook).
model, ids = load(args.model, torch.bfloat16)
capture = register_hook(model, DumpConfig(dump_path=str(out / "msit_bf16"), token_range=list(range(args.tokens))))
generate(model, ids, args.tokens)
capture.stop()

report = llmdiff.compare(out / "msprobe_fp32", capture.run_dir)
print("verdict:", report.verdict)
print("steps compared:", sorted({e.step for e in report.comparison.entries}))
report.to_markdown(out / "report.md")
