"""Op-level capture (level "op" / "mix"): ops named inside their module, filters, a fault inside an op
localized to it, and nothing left behind after the capture."""

import functools

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

import llmdiff
from llmdiff.capture.ops import op_name
from llmdiff.errors import UsageError
from llmdiff.testing import generate, tiny_llama

PROMPT = torch.tensor([[1, 5, 9, 23, 42, 7]])


def eager_llama():
    model = tiny_llama()
    model.config._attn_implementation = "eager"  # softmax and matmuls run as separate torch ops
    return model


def test_op_names():
    assert op_name(torch.softmax) == "softmax"
    assert op_name(torch.nn.functional.silu) == "silu"
    assert op_name(torch.Tensor.__matmul__) == "matmul"
    assert op_name(torch.Tensor.__bool__) == "__bool__"
    assert op_name(torch.Tensor.float) == "float"


def test_mix_records_modules_and_ops_named_inside_their_module(tmp_path):
    model = eager_llama()
    with llmdiff.capture(model, tmp_path / "r", steps="all", level="mix"):
        generate(model, PROMPT, 2)
    entries = llmdiff.open_dump(tmp_path / "r").entries
    ops = {e.module for e in entries if e.type == "op"}
    assert "model.layers.0.self_attn/softmax" in ops and "model.layers.1.self_attn/matmul" in ops
    assert "model.layers.0.mlp.act_fn/silu" in ops and "model.layers.0.self_attn.q_proj/linear" in ops
    assert not any(e.module.endswith(("/view", "/reshape", "/transpose", "/__get__", "/size")) for e in entries)
    calls = sorted(e.call for e in entries if e.module == "model.layers.0.self_attn/matmul" and e.part == "output"
                   and e.step == 0)
    assert calls == [0, 1]  # q @ k^T, then weights @ v: repeated calls kept apart
    assert any(e.module == "model.layers.0.mlp" for e in entries)  # mix: modules too


def test_op_level_only_ops_and_filters(tmp_path):
    model = eager_llama()
    with llmdiff.capture(model, tmp_path / "r", level="op", modules=[r"layers\.1\.self_attn/"],
                         ops_allow=["softmax", "matmul"]):
        generate(model, PROMPT, 1)
    entries = llmdiff.open_dump(tmp_path / "r").entries
    assert {e.module for e in entries} == {"model.layers.1.self_attn/softmax", "model.layers.1.self_attn/matmul"}
    ops_file = tmp_path / "ops.yaml"
    ops_file.write_text("deny: [softmax, matmul, add, mul]\n")
    with llmdiff.capture(model, tmp_path / "d", level="op", ops_file=ops_file):
        generate(model, PROMPT, 1)
    names = {e.module.rpartition("/")[2] for e in llmdiff.open_dump(tmp_path / "d").entries}
    assert names and not names & {"softmax", "matmul", "add", "mul"}
    ops_file.write_text("deny: softmax\n")
    with pytest.raises(UsageError, match="'deny' must be a list"):
        llmdiff.capture(model, tmp_path / "e", level="op", ops_file=ops_file)


def test_float16_softmax_inside_one_attention_is_localized_to_the_op(tmp_path):
    golden = eager_llama()
    with llmdiff.capture(golden, tmp_path / "golden", steps="all", level="mix"):
        generate(golden, PROMPT, 3)
    target = eager_llama()
    attn = target.model.layers[1].self_attn
    inside = {"on": False}
    attn.register_forward_pre_hook(lambda m, a: inside.update(on=True))
    attn.register_forward_hook(lambda m, a, o: inside.update(on=False))
    softmax = torch.nn.functional.softmax

    @functools.wraps(softmax)  # F.softmax dispatches through the module global of its own name
    def float16_softmax(x, dim=None, _stacklevel=3, dtype=None):
        if inside["on"]:  # the planted bug: this one attention's softmax runs in float16
            return softmax(x, dim=dim, dtype=torch.float16).to(dtype or x.dtype)
        return softmax(x, dim=dim, dtype=dtype)

    torch.nn.functional.softmax = float16_softmax
    try:
        with llmdiff.capture(target, tmp_path / "target", steps="all", level="mix"):
            generate(target, PROMPT, 3)
    finally:
        torch.nn.functional.softmax = softmax
    report = llmdiff.compare(tmp_path / "golden", tmp_path / "target")
    assert report.verdict == "diverged"
    top = report.culprits[0]
    assert (top.module, top.call, top.confirmed) == ("model.layers.1.self_attn/softmax", 0, True)
    assert all(c.module != "model.layers.1.self_attn" for c in report.culprits)  # not its module


def test_nothing_remains_after_capture(tmp_path):
    model = eager_llama()

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    with llmdiff.capture(model, tmp_path / "r", level="mix", steps="all"):
        generate(model, PROMPT, 1)
    assert _get_current_function_mode_stack() == [] and hooks() == before
    seen = []
    layer = model.model.layers[0]
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(_get_current_function_mode_stack()))
    with torch.no_grad():
        model(PROMPT)
    handle.remove()
    assert seen == [[]]  # a later forward runs with no torch function mode at all


def test_zero_code_run_with_op_level(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text("import torch\nfrom llmdiff.testing import tiny_llama, generate\n"
                      "m = tiny_llama()\nm.config._attn_implementation = 'eager'\n"
                      "generate(m, torch.tensor([[1, 2, 3]]), 1)\n")
    result = subprocess.run([sys.executable, "-m", "llmdiff", "run", "-o", tmp_path / "run", "--level", "op",
                             "--modules", "self_attn/", "--", sys.executable, script],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = {e.module for e in llmdiff.open_dump(tmp_path / "run").entries}
    assert "model.layers.0.self_attn/softmax" in names and all("/" in n for n in names)


def test_op_level_step_filter_records_the_same_ops_as_an_all_steps_capture(tmp_path):
    """Ops of a step not selected are neither recorded nor counted: step 1 captured alone holds the same ops,
    with the same call indices and statistics, as step 1 of a capture of every step."""
    model = eager_llama()
    with llmdiff.capture(model, tmp_path / "all", steps="all", level="op", mode="stats"):
        generate(model, PROMPT, 3)
    with llmdiff.capture(model, tmp_path / "one", steps="1", level="op", mode="stats"):
        generate(model, PROMPT, 3)
    every = [e for e in llmdiff.open_dump(tmp_path / "all").entries if e.step == 1]
    one = llmdiff.open_dump(tmp_path / "one").entries
    assert one and {e.step for e in one} == {1} and all(e.type == "op" for e in one)
    assert [(e.key, e.stats) for e in one] == [(e.key, e.stats) for e in every]
