"""Tensor-parallel compare without a real engine: a stand-in of vLLM's parallel layers, one capture per rank.

Each rank's model holds its shard of the weights in layers named and attributed as vLLM's
(``QKVParallelLinear``, ``RowParallelLinear``), so capture records the same parallel layout the real
engine does; the all-reduce is stood in for by computing the full product. The real TP=3 engine is
tested in ``test_vllm.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmdiff
from test_engines import FakeForCausalLM, FakeRunner, LogitsProcessor, serve

PARTS = (24, 12, 12)  # q, k, v widths of the fused projection (whole model)
HIDDEN = 8


class QKVParallelLinear(nn.Module):
    def __init__(self, full: torch.Tensor, rank: int, size: int) -> None:
        super().__init__()
        widths = [p // size for p in PARTS]
        rows, offset = [], 0
        for part, width in zip(PARTS, widths, strict=True):
            rows.append(full[offset + rank * width: offset + (rank + 1) * width])
            offset += part
        self.weight = nn.Parameter(torch.cat(rows))
        self.tp_rank, self.tp_size, self.gather_output, self.output_partition_sizes = rank, size, False, widths

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None


class RowParallelLinear(nn.Module):
    def __init__(self, full: torch.Tensor, rank: int, size: int) -> None:
        super().__init__()
        width = full.shape[1] // size
        self.weight = nn.Parameter(full[:, rank * width:(rank + 1) * width].clone())
        self.full = full
        self.tp_rank, self.tp_size, self.input_size_per_partition = rank, size, width
        self.reduce_results, self.input_is_parallel = True, True
        self.everyone: torch.Tensor | None = None  # every rank's input: what the all-reduce stand-in sums over
        self.skew = 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        assert self.everyone is not None
        return F.linear(self.everyone, self.full) * self.skew, None


class Attention(nn.Module):
    def __init__(self, qkv: torch.Tensor, o: torch.Tensor, rank: int, size: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(qkv, rank, size)
        self.o_proj = RowParallelLinear(o, rank, size)
        self.q_full = qkv[:PARTS[0]]
        self.q_width = PARTS[0] // size

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, _ = self.qkv_proj(hidden)
        mine = torch.tanh(qkv[..., :self.q_width])  # this rank's heads
        self.o_proj.everyone = torch.tanh(F.linear(hidden, self.q_full))
        out, _ = self.o_proj(mine)
        return out, hidden


class TPForCausalLM(FakeForCausalLM):
    """The stand-in model of test_engines (its forward, its logits processor), with parallel layers."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        nn.Module.__init__(self)
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, HIDDEN)
        weights = [(torch.randn(sum(PARTS), HIDDEN) / 3, torch.randn(HIDDEN, PARTS[0]) / 5) for _ in range(2)]
        self.layers = nn.ModuleList([Attention(qkv, o, rank, size) for qkv, o in weights])
        self.head = nn.Linear(HIDDEN, 32)
        self.logits_processor = LogitsProcessor()


for cls in (QKVParallelLinear, RowParallelLinear, Attention, TPForCausalLM):
    cls.__module__ = "vllm.model_executor.models.fake_tp"


def capture_tp(path, size, monkeypatch, fault=None, mode="tensor"):
    """One capture per rank into ``path``; ``fault(rank, model)`` may spoil one rank's model first."""
    for rank in range(size):
        model = TPForCausalLM(rank, size)
        if fault is not None:
            fault(rank, model)
        if size > 1:  # ranks of one distributed run share its folder
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(size))
        with llmdiff.capture(model, path, steps="all", mode=mode):
            serve(FakeRunner(model))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return llmdiff.open_dump(path)


@pytest.fixture()
def tp1(tmp_path, monkeypatch):
    return capture_tp(tmp_path / "tp1", 1, monkeypatch)


def test_a_tp3_dump_is_compared_as_the_unsharded_run(tmp_path, monkeypatch, tp1):
    tp3 = capture_tp(tmp_path / "tp3", 3, monkeypatch)
    assert [p.folder.name for p in tp3.processes] == ["rank0", "rank1", "rank2"]
    qkv = [e for e in tp3.entries if e.module == "layers.0.qkv_proj" and e.part == "output" and e.step == 0]
    assert [e.shape for e in qkv] == [[5, 16]] * 3  # each rank: its 8 q, 4 k and 4 v columns
    report = llmdiff.compare(tp1.path, tp3.path)
    assert report.verdict == "match", report.to_markdown()
    entry = next(e for e in report.entries if e.module == "layers.0.qkv_proj" and e.part == "output")
    # de-interleaved into q, k, v (a wrong order would be off by O(1)); a shard's product may round otherwise
    assert entry.target_shape == [5, 48] and entry.metrics["max_abs"] < 1e-6
    o_in = next(e for e in report.entries if e.module == "layers.1.o_proj" and e.part == "input")
    assert o_in.target_shape == [5, 24] and o_in.status == "pass"
    assert report.comparison.ranks_agree["target"]["verdict"] == "match"
    assert any("tensor-parallel dump of 3 ranks" in n for n in report.comparison.notes)


def test_unsharded_statistics_are_those_of_the_whole(tmp_path, monkeypatch):
    whole = capture_tp(tmp_path / "tp1", 1, monkeypatch, mode="stats")
    parts = capture_tp(tmp_path / "tp3", 3, monkeypatch, mode="stats")
    from llmdiff.compare.unshard import unshard

    view = unshard(parts)
    assert view is not None
    golden = {e.key: e.stats for e in whole.entries}
    for e in view.dump.entries:
        if e.module.endswith(("qkv_proj", "o_proj")) and e.part in ("input", "output") and e.path == "0":
            assert e.stats is not None
            for name in ("min", "max", "mean", "std", "norm"):
                assert e.stats[name] == pytest.approx(golden[e.key][name], rel=1e-5, abs=1e-6), (e.name, name)
    assert llmdiff.compare(whole.path, parts.path).verdict == "match"


def test_a_fault_in_one_ranks_shard_is_named_with_its_rank(tmp_path, monkeypatch, tp1):
    def spoil(rank, model):
        if rank == 1:
            with torch.no_grad():
                model.layers[1].qkv_proj.weight.mul_(1.05)

    tp3 = capture_tp(tmp_path / "tp3", 3, monkeypatch, fault=spoil)
    report = llmdiff.compare(tp1.path, tp3.path)
    assert report.verdict == "diverged"
    culprit = report.culprits[0]
    assert (culprit.module, culprit.ranks) == ("layers.1.qkv_proj", [1])
    entry = next(e for e in report.entries if e.module == "layers.1.qkv_proj" and e.part == "output")
    assert entry.ranks == [1] and max(entry.rank_errors[0], entry.rank_errors[2]) < 1e-6 < 0.01 < entry.rank_errors[1]
    assert "layers.1.qkv_proj on rank 1" in report.to_markdown()
    # the ranks agree with each other on what they all hold: the fault is in a shard, not a copy
    assert report.comparison.ranks_agree["target"]["verdict"] == "match"


def test_across_ranks_finds_the_rank_that_departs(tmp_path, monkeypatch, tp1):
    def skew(rank, model):
        if rank == 2:
            model.layers[1].o_proj.skew = 1.001  # its "all-reduce" returns another sum than its peers'

    tp3 = capture_tp(tmp_path / "tp3", 3, monkeypatch, fault=skew)
    report = llmdiff.compare(tp3.path, across_ranks=True)
    assert report.verdict == "diverged"
    assert (report.culprits[0].module, report.culprits[0].ranks) == ("layers.1.o_proj", [2])
    assert report.first_divergence["rank"] == 2
    assert {e.rank for e in report.entries} == {1, 2}
    assert not any(e.module.endswith("qkv_proj") and e.part == "output" for e in report.entries)  # shards: not
    # against TP=1 the rank-0 copy agrees, but the ranks' disagreement is a finding of its own
    versus = llmdiff.compare(tp1.path, tp3.path)
    assert versus.verdict == "diverged"
    assert versus.comparison.ranks_agree["target"]["first_divergence"]["rank"] == 2
    assert any("rank 2 departs from rank 0" in n for n in versus.comparison.notes)
    healthy = capture_tp(tmp_path / "tp3-ok", 3, monkeypatch)
    assert llmdiff.compare(healthy.path, across_ranks=True).verdict == "match"


def test_across_ranks_cli_and_its_bad_inputs(tmp_path, monkeypatch, capsys, tp1):
    from test_hardening import cli

    tp3 = capture_tp(tmp_path / "tp3", 3, monkeypatch)
    code, text = cli(capsys, "compare", tp3.path, "--across-ranks", "--json", tmp_path / "r.json")
    assert code == 0, text
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["across_ranks"] is True
    code, text = cli(capsys, "compare", tp1.path, "--across-ranks")
    assert code == 2 and "not a tensor-parallel dump" in text and len(text.strip().splitlines()) == 1
    code, text = cli(capsys, "compare", tp1.path, tp3.path, "--across-ranks")
    assert code == 2 and "takes one dump" in text


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 3 CPUs started for these tests (and stopped after them): its address."""
    import importlib.util
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("ray") is None:
        pytest.fail("Ray is not installed: make test installs llmdiff[ray] (pip install -e '.[ray]')")
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([ray, "start", "--head", "--num-cpus", "3", "--port", "0", "--include-dashboard=false",
                              "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    address = re.search(r"ray start --address='([^']+)'", started.stdout + started.stderr)
    assert address, started.stdout + started.stderr
    try:
        yield address.group(1), env
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


def same_results(local: dict, distributed: dict) -> None:
    """Two JSON reports agree: verdict, culprits, statuses; metric values up to float rounding."""
    assert distributed["verdict"] == local["verdict"]
    assert distributed["culprits"] == local["culprits"] and distributed["ranks_agree"] == local["ranks_agree"]
    assert distributed["first_divergence"]["name"] == local["first_divergence"]["name"]
    assert len(distributed["entries"]) == len(local["entries"])
    for a, b in zip(local["entries"], distributed["entries"], strict=True):
        assert (a["name"], a["rank"], a["step"], a["status"], a["ranks"]) == (
            b["name"], b["rank"], b["step"], b["status"], b["ranks"])
        for name, value in a["metrics"].items():
            if isinstance(value, float):
                assert b["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (a["name"], name)


def test_compare_on_a_ray_cluster_gives_the_local_report(tmp_path, monkeypatch, tp1, ray_cluster):
    import subprocess
    import sys
    from pathlib import Path

    def spoil(rank, model):
        if rank == 1:
            with torch.no_grad():
                model.layers[1].qkv_proj.weight.mul_(1.05)

    tp3 = capture_tp(tmp_path / "tp3", 3, monkeypatch, fault=spoil)
    address, env = ray_cluster
    llmdiff_bin = Path(sys.executable).parent / "llmdiff"
    reports = {}
    for name, extra in (("local", []), ("ray", ["--ray", address])):
        done = subprocess.run([llmdiff_bin, "compare", tp1.path, tp3.path, "--json", tmp_path / f"{name}.json", *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]  # diverged, as it should
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    ray_settings = reports["ray"]["settings"].pop("ray")
    assert ray_settings["cpus"] == 3 and ray_settings["tasks"] > 1 and ray_settings["worker_processes"] > 1
    same_results(reports["local"], reports["ray"])
    assert reports["ray"]["culprits"][0]["ranks"] == [1]


def test_ray_not_installed_is_one_line(tmp_path, tp1):
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from llmdiff.cli import main\n"
            f"main(['compare', {str(tp1.path)!r}, {str(tp1.path)!r}, '--ray'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("llmdiff: error: --ray needs Ray, which is not installed: "
                                   "pip install 'llmdiff[ray]'")


def test_a_damaged_shard_of_one_rank_makes_the_compare_incomplete(tmp_path, monkeypatch, tp1):
    tp3 = capture_tp(tmp_path / "tp3", 3, monkeypatch)
    shard = sorted((tmp_path / "tp3" / "rank1").glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: its entries keep statistics only
    report = llmdiff.compare(tp1.path, tp3.path)
    assert report.verdict == "incomplete" and report.exit_code == 1  # never a match on missing evidence
    assert any("lost their tensor data" in n for n in report.comparison.notes)
    assert report.comparison.ranks_agree["target"]["verdict"] == "incomplete"
    assert any("rank1" in p for p in report.comparison.problems)
