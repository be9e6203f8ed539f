import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import llmdiff
from llmdiff.testing import generate, tiny_llama


def llmdiff_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmdiff", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def write_script(path: Path, body: str) -> Path:
    path.write_text("import sys\n" + textwrap.dedent(body))
    return path


def test_zero_code_capture_includes_subprocesses(tmp_path):
    child = write_script(tmp_path / "child.py", """
        import torch
        from llmdiff.testing import tiny_llama, generate
        generate(tiny_llama(seed=1), torch.tensor([[3, 4, 5]]), 1)
    """)
    main = write_script(tmp_path / "main.py", f"""
        import subprocess, torch
        from llmdiff.testing import tiny_llama, generate
        generate(tiny_llama(), torch.tensor([[1, 2, 3, 4]]), 2)
        subprocess.run([sys.executable, {str(child)!r}], check=True)
    """)
    result = llmdiff_cli("run", "-o", tmp_path / "run", "--steps", "all", "--modules", "lm_head",
                         "--", sys.executable, main)
    assert result.returncode == 0, result.stderr
    assert "captured into" in result.stderr
    dump = llmdiff.open_dump(tmp_path / "run")
    assert [p.folder.name for p in dump.processes] == ["proc0", "proc1"]
    parent, kid = dump.processes
    assert next(s.token_ids for s in parent.steps) == [[1, 2, 3, 4]]
    assert len(parent.steps) == 2 and len(kid.steps) == 1
    for proc, rank in ((parent, 0), (kid, 1)):  # every record of a process carries that process's rank
        assert {e.rank for e in proc.entries} == {s.rank for s in proc.steps} == {rank}
    assert {e.module for e in dump.entries} == {"lm_head"}
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["exit_code"] == 0 and run["end"] and run["config"]["steps"] == "all"
    assert json.loads((tmp_path / "run" / "proc0" / "process.json").read_text())["models"][0]["class"] == \
        "LlamaForCausalLM"


def test_ranks_write_their_own_folders(tmp_path):
    script = write_script(tmp_path / "r.py", """
        import torch
        from llmdiff.testing import tiny_llama, generate
        generate(tiny_llama(), torch.tensor([[1, 2, 3]]), 1)
    """)
    from llmdiff.config import make_config
    from llmdiff.store.rundir import prepare_run_dir

    prepare_run_dir(tmp_path / "run2", [], make_config().to_json())
    env_base = {**os.environ, "LLMDIFF_RUN_DIR": str(tmp_path / "run2"), "LLMDIFF_CONFIG": "{}"}
    children = [subprocess.Popen([sys.executable, str(script)], env={**env_base, "RANK": str(r), "WORLD_SIZE": "2"})
                for r in (0, 1)]
    assert [c.wait(timeout=300) for c in children] == [0, 0]
    dump = llmdiff.open_dump(tmp_path / "run2")
    assert [p.folder.name for p in dump.processes] == ["rank0", "rank1"]
    assert {e.rank for e in dump.processes[1].entries} == {1}


def test_exit_code_of_the_program_is_passed_on(tmp_path):
    script = write_script(tmp_path / "fail.py", "sys.exit(7)\n")
    assert llmdiff_cli("run", "-o", tmp_path / "run", "--", sys.executable, script).returncode == 7


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "3-1"], "llmdiff: error: steps: range '3-1' runs backwards (start > end)"),
    (["--modules", "(bad"], "llmdiff: error: modules: '(bad' is not a valid regex"),
    (["--mode", "everything"], "llmdiff: error: Invalid value for '--mode'"),
])
def test_bad_options_fail_before_the_program_starts(tmp_path, args, message):
    marker = tmp_path / "started"
    script = write_script(tmp_path / "s.py", f"open({str(marker)!r}, 'w').close()\n")
    result = llmdiff_cli("run", "-o", tmp_path / "run", *args, "--", sys.executable, script)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_bad_config_file_and_existing_run_dir(tmp_path):
    script = write_script(tmp_path / "s.py", "pass\n")
    (tmp_path / "c.json").write_text('{"steps": "all", "colour": "red"}')
    result = llmdiff_cli("run", "-c", tmp_path / "c.json", "-o", tmp_path / "r", "--", sys.executable, script)
    assert result.returncode == 2 and "unknown option(s) colour" in result.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "data").write_text("keep")
    result = llmdiff_cli("run", "-o", tmp_path / "taken", "--", sys.executable, script)
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr
    assert (tmp_path / "taken" / "data").read_text() == "keep"


def test_config_file_options_with_cli_override(tmp_path):
    script = write_script(tmp_path / "s.py", """
        import torch
        from llmdiff.testing import tiny_llama, generate
        generate(tiny_llama(), torch.tensor([[1, 2, 3]]), 3)
    """)
    (tmp_path / "c.json").write_text(json.dumps({"modules": ["lm_head"], "steps": "all", "mode": "stats"}))
    result = llmdiff_cli("run", "-c", tmp_path / "c.json", "--steps", "1", "-o", tmp_path / "r", "--",
                         sys.executable, script)
    assert result.returncode == 0, result.stderr
    dump = llmdiff.open_dump(tmp_path / "r")
    assert {(e.step, e.module) for e in dump.entries} == {(1, "lm_head")}
    assert all(e.data is None and e.stats for e in dump.entries)


def test_default_run_dir_is_timestamped(tmp_path):
    script = write_script(tmp_path / "s.py", "pass\n")
    assert llmdiff_cli("run", "--", sys.executable, script, cwd=tmp_path).returncode == 0
    (run_dir,) = (tmp_path / "llmdiff-runs").iterdir()
    assert (run_dir / "run.json").is_file()


def test_show_summarizes_and_reports_nan(tmp_path):
    class Blowup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)
            self.b = torch.nn.Identity()

        def forward(self, x):
            return self.b(self.a(x) / 0)

    model = Blowup()
    with llmdiff.capture(model, tmp_path / "run"), torch.no_grad():
        model(torch.ones(1, 2))
    result = llmdiff_cli("show", tmp_path / "run")
    assert result.returncode == 0
    assert "a:0 output" not in result.stdout
    assert "first: step 0 b:0 input.0" in result.stdout
    assert "float32 × 6" in result.stdout


def test_show_bad_path_is_one_line(tmp_path):
    result = llmdiff_cli("show", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.strip() == f"llmdiff: error: {tmp_path / 'nope'}: no such dump folder"


KILL_SCRIPT = """
    import torch, llmdiff
    from llmdiff.testing import tiny_llama, generate
    model = tiny_llama(layers=4)
    with llmdiff.capture(model, sys.argv[1], steps="all"):
        generate(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 400)
"""


@pytest.mark.parametrize("delay", [0.0, 0.13, 0.41])
def test_sigkill_mid_run_leaves_finished_steps_readable(tmp_path, delay):
    script = write_script(tmp_path / "k.py", KILL_SCRIPT)
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(script), str(run)])
    manifest = run / "proc0" / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some steps are done, then kill at an arbitrary moment
        if manifest.exists() and manifest.read_bytes().count(b'"kind":"step"') >= 2:
            break
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    dump = llmdiff.open_dump(run)
    steps = dump.steps
    assert len(steps) >= 2
    assert [s.step for s in steps] == list(range(len(steps)))
    for record in steps:
        entries = [e for e in dump.entries if e.step == record.step]
        assert len(entries) == record.entries
        for entry in entries:
            assert dump.load(entry).shape == torch.Size(entry.shape)


def test_show_lists_modules_narrowed_by_filters(tmp_path):
    from llmdiff.testing import generate, tiny_llama

    model = tiny_llama()
    with llmdiff.capture(model, tmp_path / "run", steps="all"):
        generate(model, torch.tensor([[1, 2, 3]]), 2)
    result = llmdiff_cli("show", tmp_path / "run", "--modules", r"layers\.1\.mlp$", "--steps", "1")
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("1 modules", 1)[1]
    assert "model.layers.1.mlp" in table and "LlamaMLP" in table
    assert "input.0 [1, 1, 64] float32" in table and "output [1, 1, 64] float32" in table
    assert "model.layers.0" not in table
    listed = llmdiff_cli("show", tmp_path / "run", "--list")
    assert listed.returncode == 0 and "lm_head" in listed.stdout.split("modules", 2)[2]
    bad = llmdiff_cli("show", tmp_path / "run", "--steps", "x")
    assert bad.returncode == 2 and bad.stderr.startswith("llmdiff: error: --steps")


def test_sigint_and_sigterm_are_passed_to_the_program(tmp_path):
    # Without a terminal, a signal sent to `llmdiff run` alone reaches the program (a served engine
    # stopped by its supervisor), which shuts down cleanly and keeps its exit code.
    script = write_script(tmp_path / "s.py", """
        import signal, time
        def bye(signum, frame):
            print(f"got {signal.Signals(signum).name}", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGINT, bye)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        time.sleep(60)
        sys.exit(3)
    """)
    for sig in (signal.SIGINT, signal.SIGTERM):
        child = subprocess.Popen([sys.executable, "-m", "llmdiff", "run", "-o", str(tmp_path / sig.name), "--",
                                  sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(sig)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.strip() == f"got {sig.name}"
        assert json.loads((tmp_path / sig.name / "run.json").read_text())["exit_code"] == 0



@pytest.mark.parametrize("writing", [False, True])
@pytest.mark.parametrize(("code", "status", "stderr"),
                         [(7, 7, ""), (None, 0, ""), ("no such thing", 1, "no such thing")])
def test_the_command_leaves_without_teardown_but_loses_nothing(tmp_path, code, status, stderr, writing):
    # llmdiff.cli.leave ends the program without Python's teardown (a finalizer of a module's object does not
    # run): exit handlers still run and buffered output still comes out; a thread still writing a file is
    # waited for by a normal exit.
    script = write_script(tmp_path / "leave.py", f"""
        import atexit, threading, time
        from pathlib import Path
        from llmdiff.cli import leave
        class Finalized:
            def __del__(self):
                print("torn down")
        kept = Finalized()
        atexit.register(lambda: print("exit handler ran"))
        def late():
            time.sleep(0.5)
            Path(sys.argv[1]).write_text("written")
        if {writing!r}:
            threading.Thread(target=late).start()
        print("printed before", end=" ")  # a pipe: held in Python's buffer until the exit
        leave({code!r})
        """)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "late.txt")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stdout == "printed before exit handler ran\n" + ("torn down\n" if writing else "")
    assert done.stderr.strip() == stderr
    assert (tmp_path / "late.txt").exists() == writing


def test_the_command_starts_without_torch_and_the_api_finds_every_name(tmp_path):
    # `llmdiff run` prepares the run folder and starts the program before importing torch (it used to take
    # 1.3 s first here); `llmdiff --help` needs none. The API's names are found on first use.
    probe = subprocess.run([sys.executable, "-c", "import sys, llmdiff.cli\nprint('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr
    names = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import importlib, pkgutil, types, llmdiff
        # every module first: a subpackage imported does not take the name of a function (llmdiff.compare)
        for module in pkgutil.walk_packages(llmdiff.__path__, "llmdiff."):
            if module.name not in ("llmdiff.__main__", "llmdiff.testing"):
                importlib.import_module(module.name)
        from llmdiff import capture, compare
        from llmdiff.capture import session
        assert capture is llmdiff.capture is session.capture and compare is llmdiff.compare
        print(sorted(n for n in llmdiff.__all__ if isinstance(getattr(llmdiff, n), (types.ModuleType, type(None)))),
              dir(llmdiff) == llmdiff.__all__ and set(llmdiff.__all__) == {*llmdiff._HOMES, "__version__"})
        """)], capture_output=True, text=True, timeout=120)
    assert names.stdout.strip() == "[] True", names.stderr
    done = llmdiff_cli("run", "-o", tmp_path / "run", "--", sys.executable, "-c", "pass")
    assert done.returncode == 0, done.stderr
    versions = json.loads((tmp_path / "run" / "run.json").read_text())["versions"]
    assert versions["torch"] == torch.__version__ and versions["llmdiff"] == llmdiff.__version__
    # `llmdiff show` reads manifests and checks shards without torch (2.0-2.2 s -> 0.6-0.8 s on a decode dump)
    model = tiny_llama()
    with llmdiff.capture(model, tmp_path / "dump", mode="tensor"):
        generate(model, torch.tensor([[1, 2, 3]]), 1)
    shown = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from llmdiff.cli import main
        main(["show", {str(tmp_path / "dump")!r}])
        print("torch imported:", "torch" in sys.modules)
        """)], capture_output=True, text=True, timeout=120)
    dump = llmdiff.open_dump(tmp_path / "dump")
    assert dump.entries and all(e.data is not None for e in dump.entries)
    assert shown.returncode == 0, shown.stderr
    assert f"{len(dump.entries)} ({len(dump.entries)} with full tensors)" in shown.stdout, shown.stdout
    assert shown.stdout.rstrip().endswith("torch imported: False")
    # Neither does `llmdiff compare` of two statistics dumps (1.6 s of a 1.8-2.5 s command went to importing torch)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for name in ("stats-a", "stats-b", "stats-c"):
        model = tiny_llama()
        if name == "stats-c":
            with torch.no_grad():
                model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        with llmdiff.capture(model, tmp_path / name, mode="stats"):
            generate(model, ids, 2)
    for target, code in (("stats-b", 0), ("stats-c", 1)):
        compared = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from llmdiff.cli import main
            try:
                main(["compare", {str(tmp_path / "stats-a")!r}, {str(tmp_path / target)!r}])
            finally:
                print("torch imported:", "torch" in sys.modules)
            """)], capture_output=True, text=True, timeout=120)
        assert compared.returncode == code, compared.stderr
        assert compared.stdout.rstrip().endswith("torch imported: False"), compared.stdout
        in_process = llmdiff.compare(tmp_path / "stats-a", tmp_path / target)
        assert (in_process.verdict == "match") == (code == 0)
        if code:
            assert in_process.culprits[0].module == "model.layers.1.mlp.down_proj"
            assert "model.layers.1.mlp.down_proj" in compared.stdout
