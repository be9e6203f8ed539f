"""The seed tools' APIs and configs on llmdiff: msProbe's PrecisionDebugger, msIT's DumpConfig +
register_hook, vLLM's intermediate-logging config, and the compare flags of all three."""

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

import llmdiff
from llmdiff.compat.msit import DumpConfig, layer_name_regex, register_hook
from llmdiff.compat.msprobe import PrecisionDebugger
from llmdiff.errors import UsageError
from llmdiff.testing import generate, tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = torch.tensor([[1, 5, 9, 23, 42, 7]])


def msprobe_config(tmp_path, task="statistics", **task_options):
    options = {"scope": [], "list": [], "data_mode": ["all"], "summary_mode": "statistics", **task_options}
    config = {"task": task, "dump_path": str(tmp_path / "dump"), "rank": [], "step": [], "level": "L0",
              "async_dump": False, task: options}
    return config


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_precision_debugger_statistics_pairs_with_real_msprobe_dump(tmp_path):
    config_path = write(tmp_path / "config.json", msprobe_config(tmp_path))
    model = tiny_llama()
    debugger = PrecisionDebugger(config_path=config_path)
    debugger.start(model=model)
    generate(model, PROMPT, 3)
    debugger.stop()
    debugger.step()
    debugger.close()
    dump = llmdiff.open_dump(tmp_path / "dump")
    assert dump.format == "llmdiff" and {e.data for e in dump.entries} == {None}  # statistics only
    assert sorted({e.step for e in dump.entries}) == [0, 1, 2]
    report = llmdiff.compare(tmp_path / "dump", FIXTURES / "msprobe_statistics")
    assert report.verdict == "match" and Counter(e.status for e in report.comparison.entries)["pass"] == 231


def test_precision_debugger_steps_list_scope_data_mode_and_md5(tmp_path):
    config = msprobe_config(tmp_path, task="tensor", list=["Module.model.layers.0.mlp.LlamaMLP.forward.0"],
                            data_mode=["output"])
    config["step"] = [0, "2-3"]
    model = tiny_llama()
    debugger = PrecisionDebugger(config_path=write(tmp_path / "c.json", config))
    for _ in range(5):  # debugger steps 0..4, one forward pass each; 1 and 4 are not captured
        debugger.start(model=model)
        with torch.no_grad():
            model(PROMPT)
        debugger.stop()
        debugger.step()
    debugger.close()
    dump = llmdiff.open_dump(tmp_path / "dump")
    assert {(e.module, e.part) for e in dump.entries} == {("model.layers.0.mlp", "output")}
    assert sorted(e.step for e in dump.entries) == [0, 1, 2]  # forward passes captured, numbered in order
    assert all(e.data is not None for e in dump.entries)

    scoped = msprobe_config(tmp_path / "s", summary_mode="md5",
                            scope=["Module.model.layers.1.input_layernorm.LlamaRMSNorm.forward.0",
                                   "Module.model.layers.1.self_attn.LlamaAttention.forward.0"])
    debugger = PrecisionDebugger(config_path=write(tmp_path / "s.json", scoped))
    debugger.start(model=model)
    with torch.no_grad():
        model(PROMPT)
    debugger.stop()
    debugger.close()
    dump = llmdiff.open_dump(tmp_path / "s" / "dump")
    assert {e.module for e in dump.entries} == {  # execution order, not definition order (mlp comes first there)
        "model.layers.1.input_layernorm", "model.layers.1.self_attn", "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"}
    assert all("hash" in e.stats for e in dump.entries)


def test_precision_debugger_save_records_a_tensor(tmp_path):
    model = tiny_llama()
    debugger = PrecisionDebugger(dump_path=tmp_path / "d", task="tensor", level="L0")
    debugger.start(model=model)
    with torch.no_grad():
        model(PROMPT)
        PrecisionDebugger.save(torch.arange(4.0), "my_tensor")  # outside a forward pass: the next step
        model(PROMPT)
    debugger.stop()
    debugger.close()
    saved = [e for e in llmdiff.open_dump(tmp_path / "d").entries if e.part == "save"]
    assert [(e.module, e.shape) for e in saved] == [("my_tensor", [4])]


@pytest.mark.parametrize(("change", "message"), [
    ({"level": "L2"}, "level 'L2' is not one of L0, L1, mix"),
    ({"task": "overflow_check"}, "not supported by llmdiff"),
    ({"step": ["x"]}, "step"),
    ({"typo": 1}, "unknown key(s) typo"),
])
def test_precision_debugger_refuses_what_it_cannot_do_at_start(tmp_path, change, message):
    config = {**msprobe_config(tmp_path), **change}
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PrecisionDebugger(config_path=write(tmp_path / "c.json", config))


def test_register_hook_dump_pairs_with_real_msit_dump(tmp_path):
    model = tiny_llama()
    capture = register_hook(model, DumpConfig(dump_path=str(tmp_path), token_range=[0, 1, 2]))
    generate(model, PROMPT, 3)
    capture.stop()
    assert capture.run_dir.parent == tmp_path and capture.run_dir.name.startswith("llmdiff_dump_")
    report = llmdiff.compare(capture.run_dir, FIXTURES / "msit_tensor")
    counts = Counter(e.status for e in report.comparison.entries)
    assert report.verdict == "match" and counts["pass"] == 177 and counts["missing_in_golden"] == 0


def test_dump_config_filters(tmp_path):
    model = tiny_llama()
    config = DumpConfig(dump_path=str(tmp_path / "a"), token_range=[1], tensor_part=1,
                        layer_name="root.model.layers.1.mlp*", module_list=[torch.nn.Linear], dump_weight=True)
    capture = register_hook(model, config)
    generate(model, PROMPT, 2)
    capture.stop()
    entries = llmdiff.open_dump(capture.run_dir).entries
    activations = {(e.step, e.module, e.part) for e in entries if e.part != "param"}
    assert activations == {(1, f"model.layers.1.mlp.{p}", "output") for p in ("gate_proj", "up_proj", "down_proj")}
    weights = {e.module for e in entries if e.part == "param"}
    assert weights == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}

    logits = register_hook(model, DumpConfig(dump_path=str(tmp_path / "b"), token_range=[0, 1],
                                             dump_last_logits=True))
    generate(model, PROMPT, 2)
    logits.stop()
    assert {(e.step, e.module, e.path) for e in llmdiff.open_dump(logits.run_dir).entries} == {
        (0, "", "logits"), (1, "", "logits")}


def test_dump_config_is_not_a_singleton_and_is_validated():
    first, second = DumpConfig(token_range=[0]), DumpConfig(token_range=[3])
    assert first.token_range == [0] and second.token_range == [3]
    for bad, message in (({"mode": "modul"}, "mode must be"), ({"mode": ["api", "x"]}, "mode must be"),
                         ({"tensor_part": 3}, "tensor_part"), ({"token_range": 5}, "token_range"),
                         ({"module_list": ["Linear"]}, "module classes")):
        with pytest.raises(UsageError, match=message):
            DumpConfig(**bad)


def test_register_hook_twice_on_one_model_is_an_error(tmp_path):
    model = tiny_llama()
    capture = register_hook(model, DumpConfig(dump_path=str(tmp_path)))
    with pytest.raises(UsageError, match="already being dumped"):
        register_hook(model, DumpConfig(dump_path=str(tmp_path)))
    with pytest.warns(llmdiff.LlmdiffWarning, match="no forward call"):
        capture.stop()


def test_layer_name_glob():
    assert layer_name_regex("root") == "^$"
    assert layer_name_regex("root.model.layers.0*") == r"^model\.layers\.0.*$"
    assert layer_name_regex("*mlp*") == "^.*mlp.*$"


def test_vllm_config_dict_and_file(tmp_path):
    model = tiny_llama()
    config = {"output_dir": str(tmp_path / "vllm"), "module_call_match": [r"layers\.0\.(?!.*rotary_emb).*",
                                                                        "rotary_emb:0", "embed_tokens"],
              "log_step_ids": [0, 1], "device_names": ["cpu"], "max_tensor_size": 500}
    with llmdiff.capture(model, config=config) as run:
        generate(model, PROMPT, 3)
    assert run.run_dir.parent == tmp_path / "vllm"  # <output_dir>/<random id>, as vLLM does
    entries = llmdiff.open_dump(run.run_dir).entries
    assert sorted({e.step for e in entries}) == [0, 1]
    modules = {e.module for e in entries}
    assert "model.embed_tokens" in modules and "model.rotary_emb" in modules and "model.layers.1.mlp" not in modules
    assert {e.module for e in entries if e.module.startswith("model.layers.")} <= {
        m for m in modules if m.startswith("model.layers.0.")}
    big = [e for e in entries if e.numel > 500]
    assert big and all(e.data is None and "max_tensor_size" in e.note for e in big)
    path = write(tmp_path / "il.json", {"enabled": True, "module_call_match": "lm_head"})
    with llmdiff.capture(model, tmp_path / "explicit", config=path):
        generate(model, PROMPT, 1)
    assert {e.module for e in llmdiff.open_dump(tmp_path / "explicit").entries} == {"lm_head"}
    with pytest.raises(UsageError, match="log_step_ids"):
        llmdiff.capture(model, tmp_path / "x", config={"log_step_ids": ["first"]})


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_llmdiff_run_with_vllm_config_and_compare_with_vllm_flags(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        import torch
        from llmdiff.testing import tiny_llama, generate
        generate(tiny_llama(), torch.tensor([[1, 5, 9, 23, 42, 7]]), 2)
    """))
    config = write(tmp_path / "il.json", {"output_dir": str(tmp_path / "out"), "module_call_match": ["layers\\.1\\."],
                                          "log_step_ids": [0, 1]})
    for _ in range(2):
        result = cli("run", "-c", config, "--", sys.executable, script)
        assert result.returncode == 0, result.stderr
    run1, run2 = sorted((tmp_path / "out").iterdir())
    result = cli("compare", "--dir1", run1, "--dir2", run2, "--steps", "0,1", "--modules", ".*self_attn.*,.*mlp.*",
                 "--rtol", "1e-4", "--atol", "1e-7", "--verbose", "--output", tmp_path / "comparison_report.md")
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "comparison_report.md").read_text()
    assert "match" in report.lower() and "model.layers.1.mlp" in report
    result = cli("run", "-c", '{"enabled": false}', "--", sys.executable, "-c", "print('ran')")
    assert result.returncode == 0 and "ran" in result.stdout and "without capture" in result.stderr


def test_msit_compare_flags_preset_and_token_level(tmp_path):
    golden, target = tiny_llama(), tiny_llama(dtype=torch.bfloat16)
    for name, model in (("golden", golden), ("target", target)):
        capture = register_hook(model, DumpConfig(dump_path=str(tmp_path / name), token_range=list(range(4)),
                                                  dump_last_logits=True))
        generate(model, PROMPT, 4)
        capture.stop()
    gp, mp = (next((tmp_path / n).iterdir()) for n in ("golden", "target"))
    result = cli("compare", "-gp", gp, "-mp", mp, "-cl", "token", "--preset", "msit", "-o", f"{tmp_path / 'csv'}/")
    assert result.returncode in (0, 1), result.stderr
    csv_files = list((tmp_path / "csv").glob("llmdiff_cmp_report_*.csv"))
    assert len(csv_files) == 1
    report = llmdiff.compare(gp, mp, level="token", preset="msit")
    assert len(report.comparison.entries) == 4 and all(e.logits for e in report.comparison.entries)
    assert report.comparison.settings["preset"] == "msit"
    failing = [e for e in report.comparison.entries if e.status == "fail"]
    for e in failing:  # a token fails on msIT's rule: cosine at or below 0.999, or KL above 0.005 (bf16)
        assert e.metrics["cosine"] <= 0.999 or e.metrics["kl"] > 0.005
    for e in report.comparison.entries:
        if e.status == "pass":
            assert e.metrics["cosine"] > 0.999 and e.metrics["kl"] <= 0.005
    result = cli("compare", "-gp", gp)
    assert result.returncode == 2 and "needs two dumps" in result.stderr


def test_precision_debugger_mix_pairs_ops_with_real_msprobe_mix_dump(tmp_path):
    config = msprobe_config(tmp_path)
    config["level"] = "mix"
    model = tiny_llama()
    debugger = PrecisionDebugger(config_path=write(tmp_path / "c.json", config))
    debugger.start(model=model)
    generate(model, PROMPT, 3)
    debugger.stop()
    debugger.close()
    ours = llmdiff.open_dump(tmp_path / "dump")
    theirs = llmdiff.open_dump(FIXTURES / "msprobe_mix_statistics")
    our_ops = {e.module for e in ours.entries if e.type == "op"}
    their_ops = {e.module for e in theirs.entries if e.type == "op"}
    assert "model.layers.0.input_layernorm/rsqrt" in their_ops and their_ops <= our_ops  # same names
    report = llmdiff.compare(tmp_path / "dump", FIXTURES / "msprobe_mix_statistics")
    counts = Counter(e.status for e in report.comparison.entries)
    assert report.verdict == "match" and counts["pass"] > 700 and counts["fail"] == 0  # weights fed to ops: theirs only


def test_dump_config_api_mode_captures_ops(tmp_path):
    model = tiny_llama()
    capture = register_hook(model, DumpConfig(dump_path=str(tmp_path), mode=["api", "module"],
                                              layer_name="root.model.layers.0.mlp*"))
    generate(model, PROMPT, 1)
    capture.stop()
    entries = llmdiff.open_dump(capture.run_dir).entries
    assert {"model.layers.0.mlp", "model.layers.0.mlp.act_fn/silu"} <= {e.module for e in entries}
