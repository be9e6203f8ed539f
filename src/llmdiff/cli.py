"""The ``llmdiff`` command: argument parsing, then one call into the Python API per command.

Exit codes: 0 success (or runs match), 1 runs diverge (or the comparison is incomplete), 2 bad input,
3 an internal error of llmdiff (a bug: one line, and the traceback with ``LLMDIFF_DEBUG=1``), 130 interrupted.
``llmdiff run`` exits with the program's own code. Errors are one line.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from llmdiff.errors import LlmdiffError

#: The exit code of an unexpected error inside llmdiff (never 1, which means "diverged").
INTERNAL_ERROR = 3


class _Console(Console):
    """A console whose reader may stop reading (``llmdiff compare A B | head``): what is left to print is
    dropped, and the command still ends with its own exit code. (rich's default exits with 1, which here
    would say "diverged" of runs that match.)"""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        # Python's own buffer is flushed at exit: it goes nowhere, instead of raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())


# Piped output is not wrapped at 80 columns: tables stay one line per row in logs and files.
console = _Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = _Console(stderr=True, highlight=False)

_CAPTURE_OPTIONS = [
    click.option("--modules", "-m", multiple=True, help=r"Module path regex, repeatable; ':i' keeps the i-th call."),
    click.option("--types", "-t", multiple=True, help="Module class name, repeatable (e.g. LlamaDecoderLayer)."),
    click.option("--steps", "-s", help="Steps to capture: 'all', '0', '0-3', '0,2,5-7' (default 0)."),
    click.option("--parts", type=click.Choice(["inputs", "outputs", "both"]), help="Module inputs, outputs or both."),
    click.option("--mode", type=click.Choice(["tensor", "stats"]), help="Full tensors, or statistics only."),
    click.option("--devices", multiple=True, help="Only tensors on these devices (cpu, cuda:0, ...)."),
    click.option("--ranks", help="Only these ranks, e.g. '0,1'."),
    click.option("--max-tensor-size", type=int, help="Tensors with more elements keep statistics only."),
    click.option("--hash/--no-hash", "hash_", default=None, help="Add a content hash for bit-exactness checks."),
    click.option("--level", type=click.Choice(["module", "op", "mix"]),
                 help="Module inputs/outputs, the torch ops inside modules, or both."),
    click.option("--ops-file", type=click.Path(path_type=Path), help="YAML allow/deny lists of op names."),
]


def _capture_options(func: Any) -> Any:
    for option in reversed(_CAPTURE_OPTIONS):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmdiff")
def cli() -> None:
    """Capture intermediate tensors of LLM runs and find where two runs start to disagree."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-o", "--output", "run_dir", type=click.Path(path_type=Path),
              help="Run folder to create (default: a new one under ./llmdiff-runs/).")
@click.option("-c", "--config", "config_file", type=click.Path(path_type=Path),
              help="JSON capture options: a file or inline JSON; llmdiff's options or vLLM's intermediate-log config.")
@_capture_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run(run_dir: Path | None, config_file: Path | None, command: tuple[str, ...], **cli_options: Any) -> None:
    """Run COMMAND (a Python program, after '--') with capture on, child processes included."""
    from llmdiff.capture.autorun import CONFIG_ENV, RUN_DIR_ENV
    from llmdiff.config import config_from_mapping, is_vllm_config, load_config_file, vllm_config
    from llmdiff.store.rundir import finish_run_dir, new_run_dir, prepare_run_dir

    options = load_config_file(config_file) if config_file else {}
    if is_vllm_config(options):  # vLLM's --intermediate-log-config: its defaults and its output folder
        vllm = vllm_config(options, source=str(config_file))
        if not vllm.enabled:
            err_console.print("llmdiff: the config says enabled: false; running without capture")
            sys.exit(subprocess.call(list(command)))
        options = vllm.capture.to_json()
        run_dir = run_dir or vllm.new_run_dir()
    cli_options["hash"] = cli_options.pop("hash_")
    for key, value in cli_options.items():
        if value not in (None, ()):
            options[key] = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
    config = config_from_mapping(options, source=str(config_file or "options"))
    run_dir = run_dir or new_run_dir()
    _check_autorun_installed()
    prepare_run_dir(run_dir, [sys.argv[0], *sys.argv[1:]], config.to_json())
    env = {**os.environ, RUN_DIR_ENV: str(run_dir.resolve()), CONFIG_ENV: json.dumps(config.to_json())}
    try:
        child = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        raise LlmdiffError(f"cannot start {command[0]!r}: {exc.strerror}") from None
    previous = {sig: signal.signal(sig, lambda signum, frame: _pass_on(child, signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finish_run_dir(run_dir, exit_code=code)
    from llmdiff.store.reader import open_dump  # reads manifests without torch: this process never imports it
    from llmdiff.store.summary import summarize

    summary = summarize(open_dump(run_dir))
    err_console.print(f"llmdiff: {summary.entries} entries, {len(summary.steps)} steps, "
                      f"{len(summary.processes)} process(es) captured into {run_dir}")
    if not summary.entries:
        err_console.print("llmdiff: warning: nothing was captured: no process ran a hooked module in a selected "
                          "step (check the filters; torch.compile and CUDA graphs hide module calls: run eagerly, "
                          "e.g. vllm --enforce-eager)")
    sys.exit(code)


def _pass_on(child: subprocess.Popen[bytes], signum: int) -> None:
    """Hand SIGTERM/SIGINT to the child, except a Ctrl-C the terminal already sent to the whole foreground group."""
    if signum == signal.SIGINT:
        try:
            if os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp():
                return
        except (OSError, ValueError):  # no terminal: the signal was sent to us alone
            pass
    if child.poll() is None:
        child.send_signal(signum)


def _check_autorun_installed() -> None:
    import site
    import sysconfig

    places = {sysconfig.get_paths()["purelib"], *site.getsitepackages(), site.getusersitepackages()}
    if not any(Path(p, "llmdiff_autorun.pth").is_file() for p in places):
        err_console.print("llmdiff: warning: llmdiff_autorun.pth is not in site-packages, so child Python "
                          "processes will not capture; reinstall llmdiff with pip "
                          "(not a source checkout on PYTHONPATH)")


@cli.command()
@click.argument("dump", type=click.Path(path_type=Path))
@click.option("-l", "--list", "list_modules", is_flag=True,
              help="List the captured modules: steps, calls per step, parts with shapes and dtypes, callers.")
@click.option("--modules", multiple=True, help="Only modules matching these regexes (comma-separated, ':i' ok); "
              "implies --list.")
@click.option("--steps", help="Only these steps: '0', '0-3', '0,2,5-7'; implies --list.")
def show(dump: Path, list_modules: bool, modules: tuple[str, ...], steps: str | None) -> None:
    """Summarize a dump: steps, modules, entries, bytes, dtypes, NaN/Inf; with --list, what each module recorded."""
    from llmdiff.config import parse_modules, parse_steps
    from llmdiff.report.show import print_modules, print_summary
    from llmdiff.store.reader import open_dump
    from llmdiff.store.summary import module_rows, summarize

    patterns = parse_modules(split_patterns(modules), "--modules")
    step_set = parse_steps(steps, "--steps")
    opened = open_dump(dump)
    print_summary(summarize(opened), console)
    if list_modules or patterns or steps is not None:
        chosen = [e for e in opened.entries if e.step in step_set and (not patterns or any(
            p.matches(e.module) and p.call in (None, e.call) for p in patterns))]
        print_modules(module_rows(chosen), console)


@cli.command()
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("llmdiff-demo"),
              show_default=True, help="Folder for the two runs and the reports.")
@click.option("--tokens", type=click.IntRange(1, 512), default=64, show_default=True, help="Tokens to generate.")
@click.option("--bug", is_flag=True, help="Plant an RMSNorm that skips its float32 upcast (float16 target).")
@click.option("--engine", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="vllm: a transformers float32 golden against vLLM bfloat16 (make vllm-env), then a planted fault.")
def demo(out_dir: Path, tokens: int, bug: bool, engine: str) -> None:
    """Compare float32 and bfloat16 generations of SmolLM2-135M (offline) and write an HTML report."""
    from llmdiff.demo import run_demo, run_engine_demo

    if engine == "vllm":
        healthy, planted = run_engine_demo(out_dir, tokens=min(tokens, 32), console=console)
        sys.exit(0 if healthy.exit_code == 0 and planted.exit_code == 1 else 1)
    run_demo(out_dir, tokens=tokens, bug=bug, console=console)


def split_patterns(values: tuple[str, ...]) -> list[str]:
    """Split ``"a,b"`` into regexes at commas outside ``{}``/``[]``/``()`` (so ``x{1,2}`` survives)."""
    out: list[str] = []
    for value in values:
        depth, start = 0, 0
        for i, ch in enumerate(value):
            if ch in "{[(":
                depth += 1
            elif ch in "}])":
                depth -= 1
            if ch == "," and depth == 0:
                out.append(value[start:i])
                start = i + 1
        out.append(value[start:])
    return [p for p in out if p]


@cli.command()
@click.argument("golden", type=click.Path(path_type=Path), required=False)
@click.argument("target", type=click.Path(path_type=Path), required=False)
@click.option("--dir1", "-gp", "--golden-path", "golden_opt", type=click.Path(path_type=Path),
              help="GOLDEN given as an option (vLLM's --dir1, msIT's -gp/--golden-path).")
@click.option("--dir2", "-mp", "--my-path", "target_opt", type=click.Path(path_type=Path),
              help="TARGET given as an option (vLLM's --dir2, msIT's -mp/--my-path).")
@click.option("-o", "--output", "outputs", multiple=True,
              help="Write a report; the extension picks the format: .md .csv .json .html (none or .txt: Markdown; "
                   "an existing folder or one ending in '/': a CSV report in it). Repeatable.")
@click.option("--json", "json_file", type=click.Path(path_type=Path), help="Also write the JSON report here.")
@click.option("--rtol", type=float, help="Relative tolerance: switches the test to element-wise allclose.")
@click.option("--atol", type=float, help="Absolute tolerance: switches the test to element-wise allclose.")
@click.option("--steps", help="Only these steps: '0', '0-3', '0,2,5-7'.")
@click.option("--modules", multiple=True, help="Only modules matching these regexes (comma-separated, ':i' ok).")
@click.option("--metric", "metrics", multiple=True, help="Metric columns to show (repeatable).")
@click.option("--threshold", "thresholds", multiple=True, help="NAME=VALUE limit replacing the default budget "
              "(e.g. cosine=0.999, kl=0.005; repeatable).")
@click.option("--preset", type=click.Choice(["msit"]), help="Judge logits by a named rule: msit = cosine > 0.999 "
              "and KL < 0.005 (bf16) / 0.0001 (fp16).")
@click.option("-cl", "--compare-level", "level", type=click.Choice(["layer", "token"]), default="layer",
              show_default=True, help="token: compare only the logits of each token (msIT's -cl token).")
@click.option("--algorithm", "-alg", "--custom-algorithms", "algorithms", multiple=True,
              help="FILE.py:FUNCTION user metric (repeatable).")
@click.option("--map", "mapping", type=click.Path(path_type=Path), help="YAML/JSON module renaming rules.")
@click.option("--allow-missing", is_flag=True, help="Entries on one side only do not make the verdict incomplete.")
@click.option("--golden-engine", type=click.Choice(["auto", "hf", "vllm", "sglang"]), default="auto", show_default=True,
              help="The engine that wrote GOLDEN (detected from the dump); different engines pair canonical points.")
@click.option("--target-engine", type=click.Choice(["auto", "hf", "vllm", "sglang"]), default="auto", show_default=True,
              help="The engine that wrote TARGET.")
@click.option("--across-ranks", is_flag=True, help="Compare the ranks of ONE tensor-parallel dump with each other: "
              "every tensor each rank holds whole, rank r against rank 0.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Measure on a Ray cluster (ADDRESS, or 'auto' / none: the one RAY_ADDRESS or `ray start` "
                   "names, else a local one); needs pip install 'llmdiff[ray]'.")
@click.option("-v", "--verbose", is_flag=True, help="List every entry that does not pass.")
def compare(golden: Path | None, target: Path | None, golden_opt: Path | None, target_opt: Path | None,
            outputs: tuple[str, ...], json_file: Path | None, rtol: float | None, atol: float | None,
            steps: str | None, modules: tuple[str, ...], metrics: tuple[str, ...], thresholds: tuple[str, ...],
            preset: str | None, level: str, algorithms: tuple[str, ...], mapping: Path | None, allow_missing: bool,
            golden_engine: str, target_engine: str, across_ranks: bool, ray_address: str | None,
            verbose: bool) -> None:
    """Compare GOLDEN and TARGET dumps. Exit 0: match, 1: diverged or incomplete, 2: bad input.

    Either side may be an llmdiff, msProbe, msIT, vLLM or SGLang dump. A tensor-parallel dump (one
    folder per rank) is compared as the unsharded run it adds up to; --across-ranks takes one dump only.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from llmdiff.api import compare as run_compare
    from llmdiff.compare.tolerance import parse_thresholds

    _fixed_mmap_threshold()
    if across_ranks:
        given = [p for p in (golden, golden_opt, target, target_opt) if p is not None]
        if len(given) != 1:
            raise LlmdiffError(f"compare --across-ranks takes one dump (its ranks are compared); got {len(given)}")
        golden, target = given[0], None
    else:
        golden, target = _two_dumps(golden, target, golden_opt, target_opt)
    for output in [*outputs, *([str(json_file)] if json_file else [])]:
        _refuse_inside_inputs(Path(output), tuple(p for p in (golden, target) if p is not None))
    report_paths = [_report_path(path) for path in outputs]
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task("comparing", total=None)
        report = run_compare(golden, target, rtol=rtol, atol=atol, steps=steps, modules=split_patterns(modules),
                             thresholds=parse_thresholds(thresholds), mapping=mapping, metrics=metrics,
                             algorithms=algorithms, allow_missing=allow_missing, preset=preset, level=level,
                             engines=(golden_engine, target_engine), across_ranks=across_ranks, ray=ray_address,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    from llmdiff.report.terminal import print_comparison

    print_comparison(report.comparison, console, verbose=verbose)
    for path in report_paths:
        report.save(path, verbose=verbose)
        console.print(f"report: {path}")
    if json_file is not None:
        report.to_json(json_file)
        console.print(f"report: {json_file}")
    sys.exit(report.exit_code)


def _fixed_mmap_threshold() -> None:
    # glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, and blocks under it
    # then come from heaps that seldom shrink: a compare's peak memory depended on the order of its frees
    # (the 1.2 GB prefill pair: 0.58-1.09 GB RSS from run to run; with the threshold fixed, 0.51 GB every
    # run). A fixed threshold also turns the adjustment off. Only this command's own process is changed.
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD, 4 MiB


@cli.command()
@click.argument("golden", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("-o", "--output", "outputs", multiple=True, help="Write a report (.md .csv .json .html); repeatable.")
@click.option("--rtol", type=float, help="Relative tolerance: switches the test to element-wise allclose.")
@click.option("--atol", type=float, help="Absolute tolerance: switches the test to element-wise allclose.")
@click.option("--threshold", "thresholds", multiple=True, help="NAME=VALUE limit, e.g. rel_l2=0.01 (repeatable).")
@click.option("--map", "mapping", type=click.Path(path_type=Path), help="YAML/JSON renaming rules (module paths).")
@click.option("--modules", multiple=True, help="Only tensors of modules matching these regexes (comma-separated).")
@click.option("--allow-missing", is_flag=True, help="Tensors on one side only do not fail the comparison.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Rows of the worst-first table.")
def weights(golden: Path, target: Path, outputs: tuple[str, ...], rtol: float | None, atol: float | None,
            thresholds: tuple[str, ...], mapping: Path | None, modules: tuple[str, ...], allow_missing: bool,
            top: int) -> None:
    """Compare two weight sets, worst tensors first. Exit 0: equal within tolerance, 1: not, 2: bad input.

    GOLDEN and TARGET: .safetensors files or folders (sharded too), .pt/.bin state dicts, GGUF files
    (dequantized; Llama names mapped to Hugging Face's, q/k permutation undone) or dumps captured with
    weights=True. int8 tensors with a _scale (and _offset) sibling are dequantized first.
    """
    from llmdiff.api import compare_weights
    from llmdiff.compare.tolerance import parse_thresholds
    from llmdiff.report.terminal import print_weights

    report_paths = [_report_path(path) for path in outputs]
    with console.status("reading and comparing weights..."):
        report = compare_weights(golden, target, rtol=rtol, atol=atol, thresholds=parse_thresholds(thresholds),
                                 mapping=mapping, modules=split_patterns(modules), allow_missing=allow_missing)
    print_weights(report.comparison, console, top=top)
    for path in report_paths:
        report.save(path)
        console.print(f"report: {path}")
    sys.exit(report.exit_code)


def _two_dumps(golden: Path | None, target: Path | None, golden_opt: Path | None,
               target_opt: Path | None) -> tuple[Path, Path]:
    given = [p for p in (golden, target) if p is not None]
    if golden_opt is not None:
        given.insert(0, golden_opt)
    if target_opt is not None:
        given.append(target_opt)
    if len(given) != 2:
        raise LlmdiffError(f"compare needs two dumps (GOLDEN TARGET, or --dir1/--dir2, or -gp/-mp); got {len(given)}")
    return given[0], given[1]


def _refuse_inside_inputs(path: Path, dumps: tuple[Path, ...]) -> None:
    """A report never writes into or over a dump it reads."""
    from llmdiff.store.reader import inside

    for dump in dumps:
        if dump.exists() and inside(path, dump):
            raise LlmdiffError(f"report path {path} lies inside the input dump {dump}: write reports elsewhere "
                               "(inputs are never modified)")


def _report_path(name: str) -> Path:
    """A folder (msIT's -o) gets a CSV report inside; other paths must name a known format (none or .txt: Markdown)."""
    from llmdiff.report.model import FORMATS

    path = Path(name)
    if path.is_dir() or name.endswith(("/", os.sep)):
        stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
        path.mkdir(parents=True, exist_ok=True)
        return path / f"llmdiff_cmp_report_{stamp}.csv"
    if path.suffix.lower() not in (*FORMATS, "", ".txt"):
        raise LlmdiffError(f"-o: cannot tell the format of {path}; use .md, .csv, .json or .html")
    return path


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn :class:`LlmdiffError` into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="llmdiff", standalone_mode=False)
    except LlmdiffError as exc:
        err_console.print(f"llmdiff: error: {_printable(str(exc))}", soft_wrap=True, markup=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("llmdiff: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        err_console.print(f"llmdiff: error: {exc.format_message()}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    except KeyboardInterrupt:
        err_console.print("llmdiff: interrupted")
        sys.exit(130)
    except Exception as exc:  # a crash must never pass for a verdict (exit 1) in a script
        if os.environ.get("LLMDIFF_DEBUG"):
            raise
        text = _printable(" ".join(str(exc).split())[:300])
        err_console.print(f"llmdiff: internal error: {type(exc).__name__}: {text} (a bug in llmdiff; please report "
                          "it; LLMDIFF_DEBUG=1 shows the traceback)", soft_wrap=True, markup=False)
        sys.exit(INTERNAL_ERROR)


def entry_point() -> NoReturn:
    """The ``llmdiff`` program (its console script and ``python -m llmdiff``): :func:`main`, then :func:`leave`.
    :func:`main` itself exits the normal way, for callers that run it inside their own process."""
    try:
        main()
    except SystemExit as exc:
        leave(exc.code)
    leave(0)


def leave(code: str | int | None) -> NoReturn:
    """Exit with ``code`` (as ``sys.exit`` reads it) without the interpreter's teardown, once exit handlers have
    run and the standard streams are flushed. With torch imported, the teardown alone took 0.4 s of a 1.4 s
    ``python -c "import torch"``, and 0.3-0.75 s of each ``llmdiff compare`` (bench/run.py's dumps): it frees
    every module and object one by one, which the process's end does at once. A thread still running (a
    writer finishing a file) is waited for by the normal exit instead."""
    if threading.active_count() > 1:
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (``| head``) or stream: nothing to add
            stream.flush()
    os._exit(status)
