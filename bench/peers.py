"""llmdiff side by side with msProbe and msIT, on the same SmolLM2 workload.

    python bench/peers.py [--tokens 32] [--compare-tokens 4] [--reps 3] [--threads 2]

The peers are installed into their own cached venv (``$LLMDIFF_CACHE/bench-peers``, default
``~/.cache/llmdiff``), never into the project's: ``torch==2.13.0``, ``transformers``,
``mindstudio-probe``, ``msit`` (+ ``msit install llm``), ``pandas<3``.

1. Capture overhead: each tool in a fresh process (msProbe's debugger and msIT's config are
   process-wide singletons) times ``generate`` (prefill + N tokens) without capture and then with
   it, after a warm-up; the ratio is taken within each process, medians over repetitions, tools
   interleaved. Every tool captures every module, inputs and outputs, all steps.
2. Bytes on disk per captured step, from the same runs.
3. msProbe's own benchmark shape (a random transformers Llama, hidden 512, 8 layers, 10 forward passes
   of a 128-token prompt, 1 thread): llmdiff statistics, tensors and op-level statistics against
   msProbe's statistics (L0), each in a fresh process, interleaved.
4. Compare throughput: float32 and bfloat16 runs (prefill + M tokens) dumped by each tool, compared
   by each tool's compare (``llmdiff compare``, ``msprobe compare``, ``msit llm compare``) and by
   llmdiff reading the peers' dumps; GB/s of dump data read, peak RSS of the compare process.
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

ROOT = Path(__file__).resolve().parent
WORKER = ROOT / "peer_worker.py"
PEER_PACKAGES = ["torch==2.13.0", "transformers", "mindstudio-probe", "msit", "pandas<3", "openpyxl"]


def cache_dir() -> Path:
    return Path(os.environ.get("LLMDIFF_CACHE", Path.home() / ".cache" / "llmdiff"))


def peer_python() -> Path:
    """The peers' venv, created once (a few minutes) and reused."""
    venv = cache_dir() / "bench-peers"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.is_file():
        return python
    print(f"installing msProbe and msIT into {venv} (once; a few minutes)...", file=sys.stderr, flush=True)
    python3 = shutil.which("python3.11") or sys.executable
    try:
        subprocess.run([python3, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        subprocess.run([str(venv / "bin" / "msit"), "install", "llm"], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench/peers.py: could not install the peers ({' '.join(map(str, exc.cmd))[:120]} "
                         f"failed with exit {exc.returncode}); is the package index reachable?") from None
    stamp.touch()
    return python


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants now (msprobe compare forks workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return total


def run_with_peak(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; return (seconds, peak resident memory in MB of it and its children, sampled every
    20 ms, and its stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill up
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mb(proc.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd[:4])}... failed (exit {proc.returncode}): {stderr.strip()[-400:]}")
    return seconds, peak, stdout


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(python: Path, tool: str, mode: str, model_dir: Path | str, out: Path, tokens: int, threads: int,
           dtype: str = "float32", *extra: str) -> dict[str, float]:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    cmd = [str(python), str(WORKER), tool, mode, str(model_dir), str(out), "--tokens", str(tokens),
           "--threads", str(threads), "--dtype", dtype, *extra]
    _, _, stdout = run_with_peak(cmd, env)
    return json.loads(stdout.strip().splitlines()[-1])


CAPTURE_RUNS = [("llmdiff", "stats"), ("llmdiff", "tensor"), ("msprobe", "stats"), ("msit", "tensor"),
                ("msprobe", "tensor")]


def capture_table(peers: Path, model_dir: Path, work: Path, tokens: int, reps: int, threads: int) -> dict:
    ratios: dict[str, list[float]] = {}
    per_step: dict[str, float] = {}
    for rep in range(reps):
        for tool, mode in CAPTURE_RUNS:
            if (tool, mode) == ("msprobe", "tensor") and rep > 0:
                continue  # ~0.5 GB per step (it saves every module's weights at every call): once is enough
            python = Path(sys.executable) if tool == "llmdiff" else peers
            out = work / f"cap-{tool}-{mode}-{rep}"
            r = worker(python, tool, mode, model_dir, out, tokens, threads)
            ratios.setdefault(f"{tool} {mode}", []).append(r["tool_s"] / r["none_s"])
            per_step[f"{tool} {mode}"] = r["bytes"] / (tokens + 1)
            print(f"  {tool} {mode} rep {rep}: {r['tool_s']:.2f}s vs {r['none_s']:.2f}s no capture, "
                  f"{r['bytes'] / 1e6:.1f} MB", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return {"ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "reps": {k: len(v) for k, v in ratios.items()}, "bytes_per_step": per_step}


#: msProbe's own benchmark shape (random Llama, hidden 512, 8 layers, 10 passes of 128 tokens, 1 thread)
PREFILL_RUNS = [("llmdiff", "stats", "module"), ("llmdiff", "tensor", "module"), ("llmdiff", "stats", "op"),
                ("msprobe", "stats", "module")]


def prefill_table(peers: Path, work: Path, reps: int) -> dict:
    ratios: dict[str, list[float]] = {}
    per_pass: list[float] = []
    for rep in range(reps):
        for tool, mode, level in PREFILL_RUNS:
            python = Path(sys.executable) if tool == "llmdiff" else peers
            out = work / f"prefill-{tool}-{mode}-{level}-{rep}"
            r = worker(python, tool, mode, "-", out, 0, 1, "float32", "--workload", "prefill", "--level", level)
            name = f"{tool} {mode}" + (" (ops)" if level == "op" else "")
            ratios.setdefault(name, []).append(r["tool_s"] / r["none_s"])
            per_pass.append(r["none_s"] / 10)
            print(f"  prefill {name} rep {rep}: {r['tool_s']:.2f}s vs {r['none_s']:.2f}s no capture",
                  file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return {"ratio": {k: statistics.median(v) for k, v in ratios.items()}, "runs": {k: v for k, v in ratios.items()},
            "pass_ms": 1e3 * statistics.median(per_pass)}


def _msit_process_dir(root: Path) -> Path:
    return next(root.glob("msit_dump_*/torch_tensors/*_*"))


def compare_table(peers: Path, model_dir: Path, work: Path, tokens: int, threads: int) -> dict:
    dumps: dict[tuple[str, str], Path] = {}
    for tool, mode in (("llmdiff", "tensor"), ("msprobe", "tensor"), ("msit", "tensor")):
        for dtype in ("float32", "bfloat16"):
            out = work / f"cmp-{tool}-{dtype}"
            worker(Path(sys.executable) if tool == "llmdiff" else peers, tool, mode, model_dir, out, tokens,
                   threads, dtype)
            dumps[(tool, dtype)] = out
    def ours(tool: str) -> list[str]:
        return [sys.executable, "-m", "llmdiff", "compare", str(dumps[tool, "float32"]), str(dumps[tool, "bfloat16"])]

    probe_json = {d: str(next(dumps["msprobe", d].glob("step0/*/dump.json"))) for d in ("float32", "bfloat16")}
    jobs = {
        "llmdiff on llmdiff dumps": (ours("llmdiff"), "llmdiff"),
        "msprobe compare": ([str(peers.parent / "msprobe"), "compare", "-gp", probe_json["float32"],
                             "-tp", probe_json["bfloat16"], "-o", str(work / "msprobe-out")], "msprobe"),
        "llmdiff on msprobe dumps": (ours("msprobe"), "msprobe"),
        "msit llm compare": ([str(peers.parent / "msit"), "llm", "compare",
                              "-gp", str(_msit_process_dir(dumps["msit", "float32"])),
                              "-mp", str(_msit_process_dir(dumps["msit", "bfloat16"])),
                              "-o", str(work / "msit-out")], "msit"),
        "llmdiff on msit dumps": (ours("msit"), "msit"),
    }
    results = {}
    for name, (cmd, tool) in jobs.items():
        size = folder_bytes(dumps[(tool, "float32")]) + folder_bytes(dumps[(tool, "bfloat16")])
        seconds, peak, _ = run_with_peak(cmd, {**os.environ, "TORCHDYNAMO_DISABLE": "1"})
        results[name] = {"seconds": seconds, "bytes": size, "gb_per_s": size / seconds / 1e9, "peak_rss_mb": peak}
        print(f"  {name}: {size / 1e6:.0f} MB in {seconds:.1f}s, peak {peak:.0f} MB", file=sys.stderr, flush=True)
    for path in dumps.values():
        shutil.rmtree(path, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--compare-tokens", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from rich.console import Console

    from llmdiff.demo import converted_model

    model_dir = converted_model(Console(stderr=True))
    peers = peer_python()
    work = Path(tempfile.mkdtemp(prefix="llmdiff-peers-"))
    try:
        results = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "threads": args.threads,
                   "tokens": args.tokens, "compare_tokens": args.compare_tokens,
                   "prefill": prefill_table(peers, work, args.reps),
                   "capture": capture_table(peers, model_dir, work, args.tokens, args.reps, args.threads),
                   "compare": compare_table(peers, model_dir, work, args.compare_tokens, args.threads)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (ROOT / "peers.json").write_text(json.dumps(results, indent=1))
    report(results)


def report(r: dict) -> None:
    print(f"llmdiff vs msProbe vs msIT, {r['date']}, {r['cpus']} CPUs, torch threads {r['threads']}, SmolLM2-135M")
    pre = r["prefill"]
    print(f"\ncapture overhead, msProbe's benchmark shape (random Llama hidden 512, 8 layers, 10 passes of 128 "
          f"tokens, 1 thread, {pre['pass_ms']:.0f} ms a pass; every module; ratio to no capture, same process):")
    for name, ratio in pre["ratio"].items():
        runs = ", ".join(f"{x:.2f}" for x in pre["runs"][name])
        print(f"  {name:<22}{ratio:>7.2f}x   (runs: {runs})")
    print(f"\ncapture overhead (prefill + {r['tokens']} tokens, every module; ratio to no capture, same process):")
    print(f"  {'tool':<18}{'ratio':>8}{'per step':>12}{'runs':>6}")
    cap = r["capture"]
    for name, ratio in cap["ratio"].items():
        print(f"  {name:<18}{ratio:>7.2f}x{cap['bytes_per_step'][name] / 1e6:>9.2f} MB{cap['reps'][name]:>6}")
    print(f"\ncompare (float32 vs bfloat16 dumps, prefill + {r['compare_tokens']} tokens):")
    print(f"  {'':<26}{'dump MB':>9}{'seconds':>9}{'GB/s':>8}{'peak MB':>9}")
    cmp = r["compare"]
    for name, c in cmp.items():
        print(f"  {name:<26}{c['bytes'] / 1e6:>9.0f}{c['seconds']:>9.1f}{c['gb_per_s']:>8.3f}{c['peak_rss_mb']:>9.0f}")
    ours = cap["ratio"]
    print("\nratios:")
    print(f"  prefill capture, stats: llmdiff {pre['ratio']['llmdiff stats']:.2f}x vs msProbe "
          f"{pre['ratio']['msprobe stats']:.2f}x")
    print(f"  capture, stats:  llmdiff {ours['llmdiff stats']:.2f}x vs msProbe {ours['msprobe stats']:.2f}x")
    print(f"  capture, tensor: llmdiff {ours['llmdiff tensor']:.2f}x vs msIT {ours['msit tensor']:.2f}x "
          f"vs msProbe {ours['msprobe tensor']:.2f}x")
    for peer, ours_name in (("msprobe compare", "llmdiff on msprobe dumps"),
                            ("msit llm compare", "llmdiff on msit dumps")):
        speedup = cmp[peer]["seconds"] / cmp[ours_name]["seconds"]
        print(f"  compare of {peer.split()[0]}'s dumps: {peer} time / llmdiff time = {speedup:.1f}")


if __name__ == "__main__":
    main()
