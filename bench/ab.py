"""Capture overhead of this tree against another git revision, measured alternately on the same machine.

    python bench/ab.py REV [--workload tiny|smollm2|prefill] [--modes stats,tensor,op-stats]
                           [--pairs 3] [--reps 5] [--tokens 32]

On a shared machine the time of the same workload drifts by tens of percent within an hour, more than most
changes to the capture are worth, so two numbers taken at different times say little. Here REV's ``src/``
is exported (``git archive``) to a temporary folder and each measurement is a fresh process that imports
llmdiff either from there (before) or from this tree (after), before and after taking turns ``--pairs``
times. Inside each process the workload runs without capture and under each mode, interleaved ``--reps``
times; a ratio is a mode's fastest run over the fastest run without capture of the same process.

Workloads: ``tiny`` is the tests' 4-layer Llama (prefill + N tokens, 1 thread: the capture's own cost shows
most); ``smollm2`` is SmolLM2-135M (prefill + N tokens, 2 threads, the model ``make demo`` converts);
``prefill`` is msProbe's benchmark shape (random Llama hidden 512, 8 layers, 10 passes of 128 tokens,
1 thread). Only ``llmdiff.capture``'s public arguments are used, so any revision since they existed works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from floors import CAPTURE_MODES  # noqa: E402

#: The capture arguments of each mode (every module, every step).
MODES = {name: arguments for name, arguments in CAPTURE_MODES.items() if name != "none"}


def export_src(rev: str, into: Path) -> Path:
    """REV's ``src/`` folder, written under ``into``; a one-line SystemExit when git cannot give it."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or str(exc).encode()
        raise SystemExit(f"bench/ab.py: cannot export src/ of {rev!r}: {detail.decode().strip()}") from None
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)  # git's own archive of this repository
    return into / "src"


# -- one measuring process ------------------------------------------------------------------------------
def workload(name: str, tokens: int, model_path: str) -> tuple[Callable[[], object], Any, int]:
    """(a function running the workload once, the model it runs, torch threads to use)."""
    import torch
    from peer_worker import prefill_model, timed_generate, timed_passes

    if name == "prefill":
        model, ids = prefill_model()
        return (lambda: timed_passes(model, ids)), model, 1
    if name == "tiny":
        from llmdiff.testing import tiny_llama

        model, ids, threads = tiny_llama(layers=4), torch.tensor([[3, 17, 42, 99, 5, 64, 23, 8]]), 1
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        enc = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, return_tensors="pt")
        ids = enc if isinstance(enc, torch.Tensor) else enc["input_ids"]
        model, threads = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval(), 2
    return (lambda: timed_generate(model, ids, tokens)), model, threads


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Fastest seconds of the workload without capture and under each mode, runs interleaved."""
    import torch

    import llmdiff
    from llmdiff import capture  # imported before the clock starts (revisions since 2026-12-07 import it on first use)

    run, model, threads = workload(args.workload, args.tokens, args.model)
    torch.set_num_threads(threads)
    run()  # warm-up
    modes = args.modes.split(",")
    times: dict[str, list[float]] = {name: [] for name in ["none", *modes]}
    with tempfile.TemporaryDirectory(prefix="llmdiff-ab-") as work:
        for rep in range(args.reps):
            for name in times:
                start = time.perf_counter()
                if name == "none":
                    run()
                else:
                    with capture(model, Path(work) / f"{name}-{rep}", steps="all", **MODES[name]):
                        run()  # stopping (draining the writer) is part of the cost
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(Path(work) / f"{name}-{rep}", ignore_errors=True)
    return {"llmdiff": str(Path(llmdiff.__file__).parent), **{name: min(v) for name, v in times.items()}}


# -- the alternation ------------------------------------------------------------------------------------
def run_side(src: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--worker", "--workload", args.workload, "--modes", args.modes,
           "--reps", str(args.reps), "--tokens", str(args.tokens), "--model", args.model]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench/ab.py: the run importing llmdiff from {src} failed: {tail}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(str(result["llmdiff"])).resolve() != (src / "llmdiff").resolve():
        raise SystemExit(f"bench/ab.py: the run imported llmdiff from {result['llmdiff']}, not from {src}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", nargs="?", help="the git revision to measure against (e.g. HEAD~1, main)")
    parser.add_argument("--workload", choices=["tiny", "smollm2", "prefill"], default="tiny")
    parser.add_argument("--modes", default="stats,tensor,op-stats", help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))} (choose from {', '.join(MODES)})")
    if args.worker:
        print(json.dumps(measure(args)))
        return
    if not args.rev:
        parser.error("give the git revision to measure against")
    if args.workload == "smollm2" and not args.model:
        from rich.console import Console

        from llmdiff.demo import converted_model

        args.model = str(converted_model(Console(stderr=True)))
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="llmdiff-ab-src-") as scratch:
        sides = {f"before ({args.rev})": export_src(args.rev, Path(scratch)), "after (this tree)": ROOT / "src"}
        ratios: dict[str, dict[str, list[float]]] = {side: {m: [] for m in modes} for side in sides}
        print(f"capture overhead, {args.workload}, {args.pairs} pairs of processes, fastest of {args.reps} runs "
              f"each; ratio to no capture in the same process")
        print(f"  {'pair':5s}{'side':28s}{'no capture':>12s}" + "".join(f"{m:>11s}" for m in modes))
        for pair in range(args.pairs):
            for side, src in sides.items():
                r = run_side(src, args)
                for m in modes:
                    ratios[side][m].append(r[m] / r["none"])
                print(f"  {pair + 1:<5d}{side:28s}{r['none']:>11.3f}s"
                      + "".join(f"{r[m] / r['none']:>10.3f}x" for m in modes), flush=True)
        print("\nmedian over the pairs:")
        for side in sides:
            print(f"  {side:33s}" + "".join(f"{statistics.median(ratios[side][m]):>10.3f}x" for m in modes))
        before, after = (ratios[side] for side in sides)
        print("  after / before (overhead only)    " + "".join(
            f"{(statistics.median(after[m]) - 1) / max(statistics.median(before[m]) - 1, 1e-9):>10.2f} "
            for m in modes))


if __name__ == "__main__":
    main()
