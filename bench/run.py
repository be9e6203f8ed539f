"""llmdiff benchmarks, every ratio against a baseline measured in the same run.

    python bench/run.py [--tokens 32] [--reps 5] [--threads 2] [--quick]

1. Capture overhead on SmolLM2-135M (prefill + N decode tokens): no capture vs stats mode vs
   tensor mode (all modules, all steps), interleaved repetitions in one process; ratios of the medians
   and of the fastest runs (on a shared machine the fastest of N is the steadier of the two).
2. The same on the tiny test model.
3. Bytes on disk per captured step, and bytes written vs the sum of the captured tensors' sizes.
   Op-level capture too: ``op-stats`` (statistics of every torch op inside the modules) and
   ``mix-tensor`` (full tensors of modules and ops).
4. Compare throughput (GB/s of dump data) and peak memory, in a fresh process each, on the decode
   dumps of (1) and on a 512-token prefill dump with large tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmdiff import capture
from llmdiff.store.reader import open_dump

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from floors import CAPTURE_MODES, FLOOR_OF, FLOORS, floor  # noqa: E402
from peer_worker import timed_generate  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _nbytes(entry) -> int:
    return entry.numel * torch.empty(0, dtype=getattr(torch, entry.dtype)).element_size()


def capture_overhead(model, ids, tokens: int, reps: int, work: Path) -> dict[str, object]:
    """Median and fastest seconds per generate call for each mode and each floor (bench/floors.py),
    repetitions interleaved."""
    timed_generate(model, ids, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in [*CAPTURE_MODES, *FLOORS]}
    sizes: dict[str, int] = {}
    for rep in range(reps):
        for mode in times:
            if mode == "none":
                times[mode].append(timed_generate(model, ids, tokens))
                continue
            if mode in FLOORS:
                with floor(model, mode):
                    times[mode].append(timed_generate(model, ids, tokens))
                continue
            run_dir = work / f"{mode}-{rep}"
            session = capture(model, run_dir, steps="all", **CAPTURE_MODES[mode])
            start = time.perf_counter()
            session.start()
            timed_generate(model, ids, tokens)
            session.stop()  # draining the writer is part of the cost
            times[mode].append(time.perf_counter() - start)
            if rep == 0:
                dump = open_dump(run_dir)
                sizes[f"{mode}_disk"] = folder_bytes(run_dir)
                sizes[f"{mode}_steps"] = len(dump.steps)
                sizes[f"{mode}_entries"] = len(dump.entries)
                if mode == "tensor":
                    unique = {(e.process, e.data["file"], e.data["key"]): e for e in dump.entries if e.data}
                    sizes["tensor_bytes_captured"] = sum(_nbytes(e) for e in dump.entries if e.data)
                    sizes["tensor_bytes_unique"] = sum(_nbytes(e) for e in unique.values())
                    sizes["tensor_shard_bytes"] = sum(p.stat().st_size for p in run_dir.rglob("*.safetensors"))
                    sizes["tensor_unique_stored"] = len(unique)
                    shutil.copytree(run_dir, work / "keep-tensor", dirs_exist_ok=True)
                if mode == "stats":
                    shutil.copytree(run_dir, work / "keep-stats", dirs_exist_ok=True)
            shutil.rmtree(run_dir)
    medians = {mode: statistics.median(v) for mode, v in times.items()}
    return {"median_s": medians, "min_s": {mode: min(v) for mode, v in times.items()}, **sizes}


def compare_in_subprocess(golden: Path, target: Path, imports: str = "llmdiff.cli, llmdiff.api, llmdiff.compare.kernels"
                          ) -> dict[str, float]:
    """The compare in one process and as the command, timed. ``imports`` is what the command imports in all (a
    compare of statistics dumps never imports torch): imported before the clock starts in the one-process
    measure, so that it times the compare's own work, and timed alone as the command's start-up."""
    # VmHWM, not ru_maxrss: the latter survives exec and would report this (large) parent's peak.
    peak = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"
    code = (
        f"import json, sys, time\nimport {imports}\nfrom llmdiff import compare\n"
        "t = time.perf_counter(); r = compare(sys.argv[1], sys.argv[2]); dt = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': dt, 'verdict': r.verdict, 'entries': len(r.entries),\n"
        f"                  'peak_rss_mb': {peak}}}))\n")
    base = f"import json\nimport {imports}\nprint(json.dumps({{'peak_rss_mb': {peak}}}))\n"
    out = json.loads(subprocess.check_output([sys.executable, "-c", code, str(golden), str(target)]))
    out["baseline_rss_mb"] = json.loads(subprocess.check_output([sys.executable, "-c", base]))["peak_rss_mb"]
    out["bytes"] = folder_bytes(golden) + folder_bytes(target)
    out["gb_per_s"] = out["bytes"] / out["seconds"] / 1e9
    # The whole command, process start included: most of a short compare is importing torch.
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmdiff", "compare", str(golden), str(target)], check=False,
                   stdout=subprocess.DEVNULL)
    out["cli_seconds"] = time.perf_counter() - start
    # The same with the JSON report most automation asks for: writing it is part of the command's time.
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "llmdiff", "compare", str(golden), str(target), "-o",
                        str(Path(scratch) / "report.json")], check=False, stdout=subprocess.DEVNULL)
    out["cli_json_seconds"] = time.perf_counter() - start
    # The command's peak memory (it fixes glibc's mmap threshold for itself, which the API does not).
    command = ("import atexit, sys\n"
               f"atexit.register(lambda: print({peak}, file=sys.stderr))\n"
               "from llmdiff.cli import main\nsys.argv = ['llmdiff', 'compare', sys.argv[1], sys.argv[2]]\nmain()\n")
    done = subprocess.run([sys.executable, "-c", command, str(golden), str(target)], check=False,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out["cli_peak_rss_mb"] = float(done.stderr.strip().splitlines()[-1])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {imports}"], check=True)
    out["import_seconds"] = time.perf_counter() - start
    out["imports"] = imports
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model only (a smoke test of this script)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="llmdiff-bench-"))
    results: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                                  "cpus": os.cpu_count(), "torch": torch.__version__}
    try:
        from llmdiff.testing import tiny_llama

        tiny_ids = torch.tensor([[3, 17, 42, 99, 5, 64, 23, 8]])
        results["tiny"] = capture_overhead(tiny_llama(layers=4), tiny_ids, args.tokens, args.reps, work / "tiny")
        if not args.quick:
            from rich.console import Console
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from llmdiff.demo import PROMPT, converted_model

            path = converted_model(Console(stderr=True))
            tokenizer = AutoTokenizer.from_pretrained(path)
            enc = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                return_tensors="pt")
            ids = enc if isinstance(enc, torch.Tensor) else enc["input_ids"]
            fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            results["smollm2"] = capture_overhead(fp32, ids, args.tokens, args.reps, work / "smol")
            shutil.move(work / "smol" / "keep-tensor", work / "decode-fp32")
            shutil.move(work / "smol" / "keep-stats", work / "stats-fp32")
            bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
            with capture(bf16, work / "decode-bf16", steps="all"):
                timed_generate(bf16, ids, args.tokens)
            results["compare_decode"] = compare_in_subprocess(work / "decode-fp32", work / "decode-bf16")
            with capture(bf16, work / "stats-bf16", steps="all", mode="stats"):
                timed_generate(bf16, ids, args.tokens)
            results["compare_stats"] = compare_in_subprocess(work / "stats-fp32", work / "stats-bf16",
                                                             imports="llmdiff.cli, llmdiff.api")
            long_ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
            for name, model in (("prefill-fp32", fp32), ("prefill-bf16", bf16)):
                with capture(model, work / name, steps="0"), torch.no_grad():
                    model(long_ids)
            results["compare_prefill"] = compare_in_subprocess(work / "prefill-fp32", work / "prefill-bf16")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    (ROOT / "results.json").write_text(json.dumps(results, indent=1))


def report(results: dict) -> None:
    print(f"llmdiff benchmarks, {results['date']}, {results['cpus']} CPUs, torch threads {results['threads']}")
    for name in ("tiny", "smollm2"):
        r = results.get(name)
        if not r:
            continue
        m = r["median_s"]
        print(f"\ncapture overhead, {name} (median seconds per generate call):")
        print(f"  no capture {m['none']:.3f}s | stats {m['stats']:.3f}s | tensor {m['tensor']:.3f}s | "
              f"op-stats {m['op-stats']:.3f}s | mix-tensor {m['mix-tensor']:.3f}s")
        for label, t in (("medians", m), ("fastest", r.get("min_s"))):
            if t:
                print(f"  ratio of {label}: stats {t['stats'] / t['none']:.2f}x, "
                      f"tensor {t['tensor'] / t['none']:.2f}x, op-level stats {t['op-stats'] / t['none']:.2f}x, "
                      f"modules+ops tensor {t['mix-tensor'] / t['none']:.2f}x no capture")
        floors = [f"{FLOORS[name]} {r['min_s'][name] / r['min_s']['none']:.2f}x" for name in FLOORS
                  if name in r.get("min_s", {})]
        if floors:
            print(f"  floors (bench/floors.py, no llmdiff code), fastest: {', '.join(floors)}")
        print(f"  disk per step: stats {r['stats_disk'] / r['stats_steps'] / 1e3:.1f} KB, "
              f"tensor {r['tensor_disk'] / r['tensor_steps'] / 1e6:.2f} MB")
        print(f"  tensor mode: {r['tensor_entries']} entries of {r['tensor_bytes_captured'] / 1e6:.1f} MB; "
              f"{r['tensor_unique_stored']} distinct tensors of {r['tensor_bytes_unique'] / 1e6:.1f} MB stored "
              f"in {r['tensor_shard_bytes'] / 1e6:.1f} MB of shards "
              f"({r['tensor_shard_bytes'] / r['tensor_bytes_unique']:.3f}x); "
              f"all files {r['tensor_disk'] / 1e6:.1f} MB")
    for name in ("compare_decode", "compare_prefill", "compare_stats"):
        c = results.get(name)
        if c:
            print(f"\n{name}: {c['bytes'] / 1e6:.0f} MB of dumps, {c['entries']} entries in {c['seconds']:.2f}s = "
                  f"{c['gb_per_s']:.3f} GB/s; peak RSS {c['peak_rss_mb']:.0f} MB "
                  f"(baseline after import {c['baseline_rss_mb']:.0f} MB)")
            print(f"  `llmdiff compare` command, process start included: {c['cli_seconds']:.2f}s = "
                  f"{c['bytes'] / c['cli_seconds'] / 1e9:.3f} GB/s, of which {c['import_seconds']:.2f}s is "
                  f"starting Python and importing {_imported(c)}; peak RSS {c['cli_peak_rss_mb']:.0f} MB")
            if "cli_json_seconds" in c:
                print(f"  the same command writing a JSON report (-o report.json): {c['cli_json_seconds']:.2f}s")
    goals(results)


def _imported(c: dict) -> str:
    return "torch" if "kernels" in c.get("imports", "kernels") else "llmdiff (no torch: statistics only)"


#: Issue 13's goals: capture overhead on SmolLM2 decode (ratio to no capture), compare throughput (GB/s of both
#: dumps, `llmdiff compare` with process start). The prefill-shape goals are in bench/peers.py's output.
CAPTURE_GOALS = {"stats": 1.15, "tensor": 1.6, "op-stats": 2.0}
COMPARE_GOALS = {"compare_decode": 0.5, "compare_prefill": 2.0}


def goals(results: dict) -> None:
    """Each measured number beside its goal, and how much of a command's time starting Python and torch took."""
    smol = results.get("smollm2")
    lines = []
    if smol:
        for mode, goal in CAPTURE_GOALS.items():
            median = smol["median_s"][mode] / smol["median_s"]["none"]
            fastest = smol["min_s"][mode] / smol["min_s"]["none"]
            verdict = "met" if median <= goal else "met by the fastest run only" if fastest <= goal else "not met"
            lines.append(f"  SmolLM2 decode, {mode:9s} {median:.2f}x (fastest {fastest:.2f}x)  goal <= {goal}x  "
                         f"{verdict}")
            base = FLOOR_OF[mode]
            if verdict != "met" and base in smol["min_s"] and f"{mode}_entries" in smol:
                entries = smol[f"{mode}_entries"]
                above = (smol["min_s"][mode] - smol["min_s"][base]) / entries * 1e6
                lines.append(f"    its floor, {FLOORS[base]}: {smol['min_s'][base] / smol['min_s']['none']:.2f}x; "
                             f"llmdiff's own work above it: {above:.1f} us an entry ({entries} entries a run)")
    for name, goal in COMPARE_GOALS.items():
        c = results.get(name)
        if c:
            got = c["bytes"] / c["cli_seconds"] / 1e9
            floor = c["bytes"] / c["import_seconds"] / 1e9  # what importing torch alone leaves possible
            lines.append(f"  {name:16s} {got:.3f} GB/s  goal >= {goal} GB/s  {'met' if got >= goal else 'not met'} "
                         f"(starting Python and torch alone caps it at {floor:.2f} GB/s)")
    if lines:
        print("\nagainst issue 13's goals:")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
