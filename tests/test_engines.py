"""Engine step marking and robustness, without a real engine: a stand-in with vLLM's shape.

The stand-in model lives in a ``vllm.*`` module, as vLLM's models do, and a stand-in runner calls it
the way vLLM's model runner does: a warm-up pass outside ``execute_model``, then engine steps that
run the model and then ``logits_processor`` (outside the model's forward). The real engine is tested
in ``test_vllm.py``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import llmdiff
from llmdiff.report.show import callers_text
from llmdiff.store.summary import module_rows


class Shared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Layer(nn.Module):
    def __init__(self, shared: Shared) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.rotary = shared

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.rotary(self.proj(hidden))
        return out, hidden  # (hidden, residual), as vLLM's decoder layers


class LogitsProcessor(nn.Module):
    def forward(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return head(hidden)


class FakeForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        shared = Shared()
        self.layers = nn.ModuleList([Layer(shared) for _ in range(3)])
        self.head = nn.Linear(8, 32)
        self.logits_processor = LogitsProcessor()

    def forward(self, *, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden)
            hidden = hidden + residual
        return hidden


for cls in (Shared, Layer, LogitsProcessor, FakeForCausalLM):
    cls.__module__ = "vllm.model_executor.models.fake"


class FakeRunner:
    """Calls the model as vLLM's runner does; ``schedule`` is a list of {request id: tokens} per step."""

    def __init__(self, model: FakeForCausalLM) -> None:
        self.model = model
        self.input_batch = SimpleNamespace(req_ids=[])
        self.requests: dict[str, SimpleNamespace] = {}
        self.done: dict[str, int] = {}
        self.logits: list[torch.Tensor] = []

    def profile_run(self) -> None:
        with torch.inference_mode():
            self.model(input_ids=torch.zeros(4, dtype=torch.long), positions=torch.arange(4))

    def execute_model(self, scheduler_output: SimpleNamespace) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self.requests[new.req_id] = SimpleNamespace(num_prompt_tokens=new.prompt_len)
        if not scheduled:
            return
        order = sorted(scheduled, key=lambda r: (self.done.get(r, 0) == 0, r))  # decodes first, as vLLM's CPU
        self.input_batch.req_ids = order
        positions = torch.cat([torch.arange(self.done.get(r, 0), self.done.get(r, 0) + scheduled[r]) for r in order])
        ids = (positions * 7 + 3) % 32
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, positions=positions)
            last = torch.cumsum(torch.tensor([scheduled[r] for r in order]), 0) - 1
            self.logits.append(self.model.logits_processor(self.model.head, hidden[last]))
        for r in order:
            self.done[r] = self.done.get(r, 0) + scheduled[r]


def step_input(scheduled: dict[str, int], new: dict[str, int] | None = None) -> SimpleNamespace:
    return SimpleNamespace(num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
                           scheduled_new_reqs=[SimpleNamespace(req_id=r, prompt_len=n) for r, n in (new or {}).items()])


SCHEDULE = [  # request a (5 prompt tokens) alone, then b (9 tokens) arrives and is prefilled in two chunks
    step_input({"a": 5}, {"a": 5}),
    step_input({}),  # nothing scheduled: no forward pass, not a step
    step_input({"a": 1, "b": 4}, {"b": 9}),
    step_input({"a": 1, "b": 5}),
    step_input({"a": 1, "b": 1}),
]


def serve(runner: FakeRunner) -> list[torch.Tensor]:
    runner.profile_run()  # warm-up: never a step
    for scheduler_output in SCHEDULE:
        runner.execute_model(scheduler_output)
    return runner.logits


@pytest.mark.parametrize("discovered", [False, True], ids=["api", "zero-code"])
def test_engine_steps_skip_warmup_and_attribute_rows(tmp_path, discovered):
    plain = serve(FakeRunner(FakeForCausalLM()))
    model = FakeForCausalLM()
    runner = FakeRunner(model)
    # zero-code capture discovers the model at its first (warm-up) call and finds the runner on the stack
    with llmdiff.capture(None if discovered else model, tmp_path / "d", steps="all"):
        logits = serve(runner)
    assert all(torch.equal(a, b) for a, b in zip(plain, logits, strict=True))  # nothing changed
    assert "execute_model" not in vars(runner)  # the wrapper is gone
    dump = llmdiff.open_dump(tmp_path / "d")
    info = dump.processes[0].info
    assert info["models"][0]["engine"]["name"] == "vllm"
    assert info["warmup_calls"] == 1  # profile_run, outside execute_model
    assert [s.step for s in dump.steps] == [0, 1, 2, 3]
    assert [[(r["id"], r["arrival"], r["start"], r["rows"], r["computed"], r["prompt_tokens"], r["logits_row"])
             for r in s.requests or []] for s in dump.steps] == [
        [("a", 0, 0, 5, 0, 5, 0)],
        [("a", 0, 0, 1, 5, 5, 0), ("b", 1, 1, 4, 0, 9, 1)],
        [("a", 0, 0, 1, 6, 5, 0), ("b", 1, 1, 5, 4, 9, 1)],
        [("a", 0, 0, 1, 7, 5, 0), ("b", 1, 1, 1, 9, 9, 1)],
    ]
    assert dump.steps[1].positions == [5, 0, 1, 2, 3] and dump.steps[1].token_ids == [(p * 7 + 3) % 32
                                                                                      for p in [5, 0, 1, 2, 3]]
    # logits_processor runs outside the model's forward, inside the engine step
    assert [e.shape for e in dump.entries if e.module == "logits_processor" and e.part == "output"] == [
        [1, 32], [2, 32], [2, 32], [2, 32]]
    # inference tensors are captured; a shared module records who called it
    (shared,) = module_rows([e for e in dump.entries if e.module == "layers.0.rotary"])
    assert shared.calls_per_step == 3 and callers_text(shared.callers) == "call 0-2: layers.{0-2}"


def test_engine_model_called_outside_a_runner_falls_back_to_one_step_per_call(tmp_path):
    model = FakeForCausalLM()
    with pytest.warns(UserWarning, match="outside a vLLM model runner"), llmdiff.capture(model, tmp_path / "d",
                                                                                         steps="all"):
        for n in (3, 1):
            model(input_ids=torch.zeros(n, dtype=torch.long), positions=torch.arange(n))
    assert [s.step for s in llmdiff.open_dump(tmp_path / "d").steps] == [0, 1]


def test_a_capture_error_never_reaches_the_program(tmp_path, monkeypatch, model, prompt):
    from llmdiff.capture import session

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(session, "batch_stats", broken)
    with torch.no_grad():
        expected = model(prompt).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = llmdiff.capture(model, tmp_path / "d", steps="all")
        with run, torch.no_grad():
            got = model(prompt).logits
    assert torch.equal(expected, got)
    assert run.internal_errors >= 1
    assert sum("capture error (the program goes on): RuntimeError: boom" in str(w.message) for w in caught) == 1


def test_inference_mode_tensors_are_copied_not_deduplicated(tmp_path):
    # In inference mode there is no version counter: a tensor changed in place after its hook fired
    # must still read back as it was then.
    class InPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = InPlace(), InPlace()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y.mul_(3)  # in place, between a's output and b's input: the same tensor object
            return self.b(y)

    net = Net()
    with llmdiff.capture(net, tmp_path / "d"), torch.inference_mode():
        net(torch.ones(4))
    dump = llmdiff.open_dump(tmp_path / "d")
    values = {(e.module, e.part): dump.load(e) for e in dump.entries}
    assert torch.equal(values[("a", "output")], torch.ones(4))
    assert torch.equal(values[("b", "input")], torch.full((4,), 3.0))


def test_a_shared_module_names_its_callers_when_only_it_is_captured(tmp_path):
    model = FakeForCausalLM()
    runner = FakeRunner(model)
    with llmdiff.capture(model, tmp_path / "d", steps="0", modules=["rotary:1"]):
        serve(runner)
    entries = llmdiff.open_dump(tmp_path / "d").entries
    assert {(e.module, e.call, e.caller) for e in entries} == {("layers.0.rotary", 1, "layers.1")}


def test_parallel_layout_reads_vllm_module_attributes():
    # Stand-ins named like vLLM's parallel layers: the layout comes from their attributes, not from shapes.
    from llmdiff.engines.vllm import parallel_layout

    class ColumnParallelLinear(nn.Module):
        def __init__(self, sizes: list[int]) -> None:
            super().__init__()
            self.tp_rank, self.tp_size, self.gather_output = 1, 3, False
            self.output_partition_sizes = sizes

    class QKVParallelLinear(ColumnParallelLinear):
        def __init__(self) -> None:
            super().__init__([192, 64, 64])
            self.num_heads, self.num_kv_heads, self.head_size = 3, 1, 64

    class RowParallelLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tp_rank, self.tp_size, self.input_size_per_partition, self.reduce_results = 1, 3, 512, True

    model = nn.ModuleDict({"qkv": QKVParallelLinear(), "up": ColumnParallelLinear([512]), "down": RowParallelLinear(),
                           "norm": nn.LayerNorm(4)})
    layout = parallel_layout(model)
    assert set(layout) == {"qkv", "up", "down"}
    assert layout["qkv"] == {"kind": "qkv", "class": "QKVParallelLinear", "tp_rank": 1, "tp_size": 3,
                             "output_partition_sizes": [192, 64, 64], "gather_output": False, "num_heads": 3,
                             "num_kv_heads": 1, "head_size": 64, "shard_dim": -1}
    assert layout["up"]["kind"] == "column" and layout["up"]["shard_dim"] == -1
    assert layout["down"]["kind"] == "row" and layout["down"]["shard_dim"] == -1
