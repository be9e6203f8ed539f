"""Real SGLang 0.5.23 dumps (tests/fixtures/sglang): read as module calls, localized, paired with transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import llmdiff
from llmdiff.store.formats.sglang import module_part

SGLANG = Path(__file__).parent / "fixtures" / "sglang"


@pytest.mark.parametrize(("name", "expected"), [
    ("non_intrusive__model.layers.0.input_layernorm.inputs.0", ("model.layers.0.input_layernorm", "input", "0")),
    ("non_intrusive__model.layers.0.self_attn.inputs.hidden_states", ("model.layers.0.self_attn", "kwarg",
                                                                      "hidden_states")),
    ("non_intrusive__model.layers.0.post_attention_layernorm.output.1",
     ("model.layers.0.post_attention_layernorm", "output", "1")),
    ("non_intrusive__logits_processor.output.next_token_logits", ("logits_processor", "output", "next_token_logits")),
    ("non_intrusive__model.output", ("model", "output", "")),
    ("non_intrusive__inputs.1", ("", "input", "1")),
    ("non_intrusive__output.next_token_logits", ("", "output", "next_token_logits")),
    ("input_ids", None), ("attn_out", None), ("non_intrusive__model.layers.0", None),
])
def test_dumper_names_are_module_calls(name, expected):
    assert module_part(name) == expected


def test_a_real_dump_reads_as_modules_with_request_metadata():
    dump = llmdiff.open_dump(SGLANG / "fp32")
    assert dump.format == "sglang" and not dump.problems
    modules = {e.module for e in dump.entries}
    assert "model.layers.0.input_layernorm" in modules and len(modules) == 60  # not one "module" per file
    norm = [e for e in dump.entries if e.step == 0 and e.module == "model.layers.1.input_layernorm"]
    assert sorted((e.part, e.path) for e in norm) == [("input", "0"), ("input", "1"), ("output", "0"),
                                                      ("output", "1")]
    assert [s.step for s in dump.steps] == [0, 1, 2]
    prefill, decode = dump.steps[0], dump.steps[1]
    assert prefill.positions == list(range(37)) and len(prefill.token_ids or []) == 37
    assert prefill.requests == [{"id": "41fe3f25a331474081e3894714bf0586", "arrival": None, "start": 0, "rows": 37,
                                 "computed": 0, "prompt_tokens": None, "logits_row": 0}]
    assert decode.positions == [37] and decode.token_ids == [504]  # the first generated token, fed back
    info = dump.processes[0].info
    assert info["sglang_parallel_info"]["tp_size"] == 1 and info["world_size"] == 1
    # the batch files stay entries too; a name that fits no rule keeps the save treatment
    assert {e.part for e in dump.entries if e.module in ("input_ids", "positions", "seq_lens")} == {"save"}


def test_names_that_fit_no_rule_are_saves_listed_not_dropped(tmp_path):
    folder = tmp_path / "sg"
    shutil.copytree(SGLANG / "fp32", folder)
    torch.save({"value": torch.ones(2), "meta": {}}, folder / "step=0___rank=0___dump_index=999___name=my.point.pt")
    entry = next(e for e in llmdiff.open_dump(folder).entries if e.module == "my.point")
    assert (entry.part, entry.path) == ("save", "")


def test_healthy_bfloat16_matches_float32_in_sglang():
    report = llmdiff.compare(SGLANG / "fp32", SGLANG / "bf16")
    assert report.verdict == "match", (report.first_divergence, report.culprits[:2])
    logits = [e for e in report.entries if e.module == "logits_processor" and e.part == "output"]
    assert logits and all(e.logits for e in logits)  # judged by KL, in the runs' (bf16) precision


def plant(dump: Path, name: str, factor: float) -> None:
    for file in dump.glob(f"*___name=non_intrusive__{name}___*.pt"):
        data = torch.load(file, weights_only=True)
        data["value"] = data["value"] * factor
        torch.save(data, file)


def test_a_fault_inside_sglang_is_localized(tmp_path):
    faulty = tmp_path / "faulty"
    shutil.copytree(SGLANG / "fp32", faulty)
    plant(faulty, "model.layers.1.mlp.down_proj.output", 1.05)
    report = llmdiff.compare(SGLANG / "fp32", faulty)
    assert report.verdict == "diverged"
    assert report.culprits[0].module == "model.layers.1.mlp.down_proj" and report.culprits[0].confirmed
    assert "inputs agree" in report.culprits[0].reason
    assert not any("module inputs were not captured" in n for n in report.comparison.notes)


@pytest.fixture(scope="module")
def hf_golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers float32 on the fixtures' prompt (the chat template of the same question), 3 tokens."""
    from rich.console import Console
    from transformers import AutoTokenizer

    from llmdiff.demo import converted_model, hf_capture

    model_dir = converted_model(Console(quiet=True))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, return_tensors="pt")
    ids = encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]
    run = tmp_path_factory.mktemp("hf") / "hf"
    assert hf_capture(model_dir, "float32", [ids[0].tolist()], 3, run) == [[504, 3575, 282]]  # "The capital of"
    return run


@pytest.mark.slow
def test_transformers_against_sglang_pairs_canonical_points(hf_golden):
    report = llmdiff.compare(hf_golden, SGLANG / "fp32")
    assert report.verdict == "match", (report.first_divergence, report.culprits[:2])
    c = report.comparison
    assert c.settings["engines"] == ["hf", "sglang"]
    passed = [e for e in c.entries if e.status == "pass"]
    per_step = {e.step: 0 for e in passed}
    for e in passed:
        per_step[e.step] += 1
    assert list(per_step.values()) == [84, 84, 84]  # layers 0-1 in full, 30 MLP outputs, the norm, lm_head
    stream = next(e for e in passed if e.module == "model.layers.1" and e.part == "output")
    assert stream.target_source == ("model.layers.1.mlp output + model.layers.1.post_attention_layernorm output.1")
    # transformers' hidden_states[2] in float32: exactly where SGLang's dumps were made, within float32 rounding
    # where the BLAS kernels differ (measured on an AMD EPYC: max |diff| 1.5e-5, rel_l2 ~1e-7)
    assert stream.metrics["rel_l2"] < 1e-6, stream.metrics
    assert max(e.metrics["rel_l2"] for e in passed if e.metrics.get("rel_l2") is not None) < 1e-5
    # detection can be overridden: told both are SGLang, the dumps pair by module name instead (and mostly do not)
    by_name = llmdiff.compare(hf_golden, SGLANG / "fp32", engines=("sglang", "sglang")).comparison
    assert by_name.settings["engines"] is None and by_name.verdict != "match"


@pytest.mark.slow
def test_transformers_float32_against_sglang_bfloat16_matches_within_budget(hf_golden):
    report = llmdiff.compare(hf_golden, SGLANG / "bf16")
    assert report.verdict == "match", (report.first_divergence, report.culprits[:2])
    assert max(e.error for e in report.entries if e.error is not None) > 1e-3


@pytest.mark.slow
def test_a_fault_on_the_sglang_side_is_named_against_transformers(hf_golden, tmp_path):
    faulty = tmp_path / "faulty"
    shutil.copytree(SGLANG / "fp32", faulty)
    plant(faulty, "model.layers.0.self_attn.qkv_proj.output", 1.02)
    report = llmdiff.compare(hf_golden, faulty)
    assert report.verdict == "diverged"
    top = report.culprits[0]
    assert top.target_module == "model.layers.0.self_attn.qkv_proj" and top.module.endswith("_proj")
