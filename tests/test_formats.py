"""Reading the dumps of other tools: real msProbe and msIT fixtures (tests/fixtures/make_fixtures.py),
vLLM and SGLang layouts written here, and what a malicious pickle gets."""

import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import llmdiff
from llmdiff.errors import DumpError
from llmdiff.testing import generate, tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"
MSPROBE_STATS = FIXTURES / "msprobe_statistics"
MSPROBE_TENSOR = FIXTURES / "msprobe_tensor"
MSIT = FIXTURES / "msit_tensor"
PROMPT = torch.tensor([[1, 5, 9, 23, 42, 7]])  # the fixtures' run: tiny_llama(seed=0), 3 greedy tokens


def llmdiff_run(path, model=None, **options):
    model = model or tiny_llama()
    options.setdefault("steps", "all")
    with llmdiff.capture(model, path, **options):
        generate(model, PROMPT, 3)
    return path


def statuses(report):
    return Counter(e.status for e in report.comparison.entries)


def test_msprobe_statistics_dump_is_read_with_steps_calls_and_parts():
    dump = llmdiff.open_dump(MSPROBE_STATS)
    assert dump.format == "msprobe" and not dump.problems
    assert sorted({e.step for e in dump.entries}) == [0, 1, 2]  # forward.0..2 of one debugger step
    assert {e.call for e in dump.entries} == {0}
    by_key = {(e.step, e.module, e.part, e.path): e for e in dump.entries}
    attn = by_key[(1, "model.layers.0.self_attn", "kwarg", "hidden_states")]
    assert attn.type == "LlamaAttention" and attn.shape == [1, 1, 64] and attn.dtype == "float32"
    assert set(attn.stats) == {"max", "min", "mean", "norm"} and attn.data is None
    assert (0, "model.layers.0.self_attn", "output", "0") in by_key  # (out, None) stays a tuple
    assert (0, "model.norm", "output", "") in by_key  # a single output is unwrapped, as llmdiff records it
    assert (0, "model", "output", "last_hidden_state") in by_key
    assert (0, "lm_head", "param", "weight") in by_key
    for level in (MSPROBE_STATS / "step0", MSPROBE_STATS / "step0" / "proc0"):  # any level of its folders
        assert len(llmdiff.open_dump(level).entries) == len(dump.entries)


def test_msprobe_tensor_dump_loads_tensors_safely():
    dump = llmdiff.open_dump(MSPROBE_TENSOR)
    entry = next(e for e in dump.entries if e.module == "lm_head" and e.part == "output")
    tensor = dump.load(entry)
    assert list(tensor.shape) == entry.shape == [1, 1, 128]  # HF computes the last position's logits
    assert tensor.norm().item() == pytest.approx(entry.stats["norm"], rel=1e-5)


def test_msit_dump_is_read_from_any_level_of_its_folders():
    dump = llmdiff.open_dump(MSIT)
    assert dump.format == "msit" and not dump.problems
    assert sorted({e.step for e in dump.entries}) == [0, 1, 2]
    names = {(e.module, e.part, e.path) for e in dump.entries}
    assert ("model.layers.1.mlp.down_proj", "input", "0") in names
    assert ("model.rotary_emb", "output", "1") in names and ("lm_head", "output", "") in names
    assert next(e for e in dump.entries if e.module == "model.layers.0").type == "LlamaDecoderLayer"
    process = next(MSIT.glob("msit_dump_*/torch_tensors/cpu_*"))
    for folder in (MSIT, process.parent.parent, process.parent, process):
        assert len(llmdiff.open_dump(folder).entries) == len(dump.entries)


def test_llmdiff_msprobe_and_msit_dumps_of_one_run_pair_up_and_match(tmp_path):
    ours = llmdiff_run(tmp_path / "ours")
    report = llmdiff.compare(MSPROBE_STATS, MSIT)
    counts = statuses(report)
    assert report.verdict == "match" and counts["pass"] == 177  # every msIT entry pairs with msProbe's
    assert report.comparison.settings["formats"] == ["msprobe", "msit"]
    assert any("capture different things" in n for n in report.comparison.notes)
    report = llmdiff.compare(ours, MSIT)
    assert report.verdict == "match" and statuses(report)["pass"] == 177
    report = llmdiff.compare(ours, MSPROBE_STATS)
    assert report.verdict == "match" and statuses(report)["pass"] == 231
    assert {e.kind for e in report.comparison.entries if e.status == "pass"} == {"stats"}


def test_a_fault_is_localized_against_a_foreign_golden(tmp_path):
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    mlp.register_forward_hook(lambda m, a, out: out * 1.05)
    target = llmdiff_run(tmp_path / "bad", model)
    report = llmdiff.compare(MSIT, target)
    assert report.verdict == "diverged"
    assert report.first_divergence["module"] == "model.layers.1.mlp"
    assert report.culprits[0].module == "model.layers.1.mlp"


def write_vllm_layout(source, root, device="cpu"):
    """Write an llmdiff dump in vLLM's intermediate-logging layout (its logging was never merged upstream,
    so the layout comes from its documentation)."""
    dump = llmdiff.open_dump(source)
    run = root / "0f1e2d3c-run"
    for e in dump.entries:
        if e.data is None or e.part == "kwarg" or (e.part == "output" and e.path not in ("", "0")):
            continue
        folder = run / f"step_{e.step}" / (e.module if e.call == 0 else f"{e.module}_{e.call}")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"inputs_{e.path}_{device}.pt" if e.part == "input" else (
            f"outputs_{device}.pt" if e.path == "" else f"outputs_{e.path}_{device}.pt")
        torch.save(dump.load(e).clone(), folder / name)
        (folder / ("inputs.json" if e.part == "input" else "outputs.json")).write_text("{}")
    return root


def test_vllm_layout_dump_compares_against_llmdiff(tmp_path):
    ours = llmdiff_run(tmp_path / "ours")
    vllm_root = write_vllm_layout(ours, tmp_path / "vllm_intermediates", device="cuda_0")
    dump = llmdiff.open_dump(vllm_root)  # output_dir with one run in it
    assert dump.format == "vllm" and sorted({e.step for e in dump.entries}) == [0, 1, 2]
    assert {e.device for e in dump.entries} == {"cuda:0"}
    step_only = llmdiff.open_dump(vllm_root / "0f1e2d3c-run" / "step_1")
    assert {e.step for e in step_only.entries} == {1}
    report = llmdiff.compare(ours, vllm_root)
    assert report.verdict == "match" and statuses(report)["pass"] == len(dump.entries)


def test_sglang_dumper_files_pair_with_llmdiff_save(tmp_path):
    sg = tmp_path / "sglang_dump_1700000000.0_0"
    sg.mkdir()
    values = {}
    for step in range(2):
        for index, name in enumerate(("attn_out", "mlp_out", "attn_out")):
            value = torch.randn(3, 8)
            values[(step, name, index)] = value
            torch.save({"value": value, "meta": {"layer": 0}},
                       sg / f"forward_pass_id={step}___rank=0___dump_index={step * 3 + index}___name={name}.pt")
    dump = llmdiff.open_dump(sg)
    assert dump.format == "sglang"
    keys = sorted((e.step, e.module, e.call, e.part) for e in dump.entries)
    assert keys[:3] == [(0, "attn_out", 0, "save"), (0, "attn_out", 1, "save"), (0, "mlp_out", 0, "save")]
    entry = next(e for e in dump.entries if (e.step, e.module, e.call) == (1, "attn_out", 1))
    assert torch.equal(dump.load(entry), values[(1, "attn_out", 2)])
    assert llmdiff.compare(sg, sg).verdict == "match"


class Payload:
    """A pickle that runs a command when loaded: what a hostile dump file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_a_foreign_dump_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    msit = shutil.copytree(MSIT, tmp_path / "msit")
    victim = next(msit.rglob("root.model.layers.1.mlp/output.pth"))
    victim.write_bytes(pickle.dumps(Payload(marker)))
    dump = llmdiff.open_dump(msit)
    assert any("refused to load" in p and "output.pth" in p for p in dump.problems)
    assert not marker.exists()
    probe = shutil.copytree(MSPROBE_TENSOR, tmp_path / "probe")
    victim = next(probe.rglob("*lm_head.Linear.forward.0.output.0.pt"))
    victim.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DumpError, match="refused to load"):
        llmdiff.compare(probe, probe)
    result = subprocess.run([sys.executable, "-m", "llmdiff", "compare", str(probe), str(probe)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.startswith("llmdiff: error:") and "refused to load" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
