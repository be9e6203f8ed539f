from pathlib import Path

import pytest
import torch

import llmdiff
from llmdiff.errors import LlmdiffError
from llmdiff.testing import generate, tiny_llama


def entries_by_name(dump):
    return {(e.step, e.name): e for e in dump.entries}


@pytest.mark.parametrize("mode,level", [("tensor", "module"), ("stats", "module"), ("stats", "mix")])
def test_capture_does_not_change_outputs(model, prompt, tmp_path, mode, level):
    reference = generate(model, prompt, 5)
    with torch.no_grad():
        logits = model(prompt).logits
    with llmdiff.capture(model, tmp_path / "run", steps="all", hash=True, mode=mode, level=level):
        captured = generate(model, prompt, 5)
        with torch.no_grad():
            captured_logits = model(prompt).logits
    assert torch.equal(reference, captured)
    assert torch.equal(logits, captured_logits)  # bit-identical


def test_hooks_are_gone_after_stop(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "run"):
        generate(model, prompt, 1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_generate_steps_token_ids_and_kwargs(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "run", steps="all"):
        tokens = generate(model, prompt, 3)
    dump = llmdiff.open_dump(tmp_path / "run")
    assert [s.step for s in dump.steps] == [0, 1, 2]
    assert dump.steps[0].token_ids == prompt.tolist()
    assert dump.steps[1].token_ids == [[tokens[0, 6].item()]]
    by_name = entries_by_name(dump)
    assert by_name[(0, "model.embed_tokens:0 input.0")].shape == [1, 6]
    assert by_name[(1, "model.embed_tokens:0 input.0")].shape == [1, 1]
    # HF passes hidden_states to attention by keyword: captured and named by keyword
    assert by_name[(0, "model.layers.0.self_attn:0 kwarg.hidden_states")].shape == [1, 6, 64]
    # nested outputs: a tuple from attention, a ModelOutput from the root
    assert (0, "model.layers.0.self_attn:0 output.0") in by_name
    logits = by_name[(0, "<root>:0 output.logits")]
    assert logits.shape == [1, 1, 128]  # generate asks for the last position's logits only
    with torch.no_grad():
        expected = model(prompt).logits[:, -1:]
    assert torch.allclose(dump.load(logits), expected, atol=1e-6)


def test_default_is_step_zero_only(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "run"):
        generate(model, prompt, 3)
    dump = llmdiff.open_dump(tmp_path / "run")
    assert {e.step for e in dump.entries} == {0}


def test_step_ranges(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "run", steps="1,3-4", modules="lm_head"):
        generate(model, prompt, 6)
    dump = llmdiff.open_dump(tmp_path / "run")
    assert sorted({e.step for e in dump.entries}) == [1, 3, 4]
    assert {e.module for e in dump.entries} == {"lm_head"}


def test_module_regex_type_and_parts_filters(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "a", modules=[r"layers\.1\.mlp$"], parts="outputs"):
        generate(model, prompt, 1)
    names = [e.name for e in llmdiff.open_dump(tmp_path / "a").entries]
    assert names == ["model.layers.1.mlp:0 output"]

    with llmdiff.capture(model, tmp_path / "b", types=["LlamaRMSNorm"], parts="inputs"):
        generate(model, prompt, 1)
    entries = llmdiff.open_dump(tmp_path / "b").entries
    assert {e.type for e in entries} == {"LlamaRMSNorm"}
    assert {e.part for e in entries} == {"input"}
    assert len({e.module for e in entries}) == 5  # 2 per layer + final norm


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(self.inner(x) * 2)


def test_call_index_selects_inputs_and_outputs_of_the_same_call(tmp_path):
    model = Twice()
    x = torch.randn(2, 4)
    with llmdiff.capture(model, tmp_path / "run", modules=["inner:1"], steps="all"), torch.no_grad():
        model(x)
        model(x)
    dump = llmdiff.open_dump(tmp_path / "run")
    assert [(e.step, e.name) for e in dump.entries] == [
        (0, "inner:1 input.0"), (0, "inner:1 output"), (1, "inner:1 input.0"), (1, "inner:1 output")]
    first_out = model.inner(x)
    second_in = dump.load(dump.entries[0])
    assert torch.allclose(second_in, first_out.detach() * 2)
    assert torch.allclose(dump.load(dump.entries[1]), model.inner(second_in).detach())


def test_later_inplace_change_does_not_alter_the_record(tmp_path):
    class Mutating(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            y.mul_(0)  # in place, after lin's output was captured
            return y

    model = Mutating()
    x = torch.ones(1, 3)
    with llmdiff.capture(model, tmp_path / "run", modules=["lin"], parts="outputs"), torch.no_grad():
        model(x)
        expected = model.lin(x)
    dump = llmdiff.open_dump(tmp_path / "run")
    assert torch.equal(dump.load(dump.entries[0]), expected)
    assert dump.entries[0].stats["max"] == pytest.approx(expected.max().item())


def test_a_view_stores_only_its_own_elements(tmp_path):
    class Slicer(torch.nn.Module):
        def forward(self, x):
            return x

    big = torch.randn(1000, 1000)
    with llmdiff.capture(model := Slicer(), tmp_path / "run2", parts="inputs"):
        model(big[:2, :3])
    dump = llmdiff.open_dump(tmp_path / "run2")
    (entry,) = dump.entries
    assert torch.equal(dump.load(entry), big[:2, :3])
    shard = next(Path(tmp_path / "run2").glob("proc0/shard-*.safetensors"))
    assert shard.stat().st_size < 1000  # 24 bytes of data, not the 4 MB base storage


def test_stats_mode_and_hash(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "run", mode="stats", hash=True, modules=["lm_head"]):
        generate(model, prompt, 1)
    dump = llmdiff.open_dump(tmp_path / "run")
    assert not list((tmp_path / "run").glob("*/*.safetensors"))
    out = next(e for e in dump.entries if e.part == "output")
    with torch.no_grad():
        logits = model(prompt).logits[:, -1:]
    stats = out.stats
    assert out.data is None
    assert stats["min"] == pytest.approx(logits.min().item(), rel=1e-6)
    assert stats["max"] == pytest.approx(logits.max().item(), rel=1e-6)
    assert stats["mean"] == pytest.approx(logits.mean().item(), abs=1e-6)
    assert stats["std"] == pytest.approx(logits.std(correction=0).item(), rel=1e-5)
    assert stats["norm"] == pytest.approx(logits.norm().item(), rel=1e-5)
    assert stats["nan"] == stats["inf"] == 0
    assert len(stats["hash"]) == 32
    with llmdiff.capture(model, tmp_path / "again", mode="tensor", hash=True, modules=["lm_head"]):
        generate(model, prompt, 1)
    again = next(e for e in llmdiff.open_dump(tmp_path / "again").entries if e.part == "output")
    assert again.stats["hash"] == stats["hash"]


def test_nan_and_inf_are_counted():
    from llmdiff.capture.stats import tensor_stats

    stats = tensor_stats(torch.tensor([1.0, float("nan"), float("inf"), -2.0, float("nan")]))
    assert (stats["nan"], stats["inf"], stats["min"], stats["max"]) == (2, 1, -2.0, 1.0)
    assert tensor_stats(torch.tensor([float("nan")]))["mean"] is None
    bf16 = tensor_stats(torch.tensor([1.0, 3.0], dtype=torch.bfloat16))
    assert bf16["mean"] == 2.0 and bf16["std"] == 1.0


def test_max_tensor_size_keeps_statistics_not_silence(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "run", max_tensor_size=100, modules=["lm_head", "embed_tokens"]):
        generate(model, prompt, 1)
    dump = llmdiff.open_dump(tmp_path / "run")
    logits = next(e for e in dump.entries if e.module == "lm_head" and e.part == "output")
    assert logits.data is None and logits.stats is not None
    assert logits.note == "stats only: 128 elements > max_tensor_size 100"
    ids = next(e for e in dump.entries if e.module == "model.embed_tokens" and e.part == "input")
    assert ids.data is not None


def test_device_and_rank_filters(model, prompt, tmp_path):
    with llmdiff.capture(model, tmp_path / "gpu", devices=["cuda:0"]):
        generate(model, prompt, 1)
    assert llmdiff.open_dump(tmp_path / "gpu").entries == []
    with llmdiff.capture(model, tmp_path / "cpu", devices=["cpu"], modules="lm_head"):
        generate(model, prompt, 1)
    assert len(llmdiff.open_dump(tmp_path / "cpu").entries) == 2
    with llmdiff.capture(model, tmp_path / "rank1", ranks=[1]):
        generate(model, prompt, 1)
    assert llmdiff.open_dump(tmp_path / "rank1").entries == []


def test_save_and_manual_steps(tmp_path):
    with llmdiff.capture(None, tmp_path / "run", steps="all", auto_step=False) as run:
        for i in range(3):
            llmdiff.save(torch.full((2,), float(i)), "my_point")
            llmdiff.save(torch.full((2,), float(-i)), "my_point")
            run.step()
    dump = llmdiff.open_dump(tmp_path / "run")
    assert [(e.step, e.name) for e in dump.entries][:2] == [(0, "my_point:0 save"), (0, "my_point:1 save")]
    assert [s.step for s in dump.steps] == [0, 1, 2]
    assert dump.load(dump.entries[-2]).tolist() == [2.0, 2.0]
    llmdiff.save(torch.ones(1), "outside")  # no active capture: nothing happens


def test_existing_run_dir_is_never_overwritten(model, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    with pytest.raises(LlmdiffError, match="already exists and is not empty"):
        llmdiff.capture(model, tmp_path / "run").start()
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


def test_zero_code_discovery_names_and_kwargs(prompt, tmp_path):
    model = tiny_llama()
    with llmdiff.capture(None, tmp_path / "run", steps="0-1"):
        generate(model, prompt, 2)
    dump = llmdiff.open_dump(tmp_path / "run")
    names = {(e.step, e.name) for e in dump.entries}
    assert (0, "<root>:0 kwarg.input_ids") in names  # the discovery call's keyword inputs, recorded at exit
    assert (0, "model.layers.0.self_attn:0 kwarg.hidden_states") in names
    assert dump.steps[0].token_ids == prompt.tolist()
    assert [s.step for s in dump.steps] == [0, 1]


def test_compiled_model_warns(tmp_path):
    model = torch.nn.Linear(2, 2)
    model._orig_mod = torch.nn.Linear(2, 2)  # what torch.compile's wrapper looks like
    with pytest.warns(llmdiff.LlmdiffWarning, match="torch.compile"), llmdiff.capture(model, tmp_path / "r"):
        pass


def test_writer_back_pressure_keeps_everything(tmp_path):
    from llmdiff.store.schema import StepRecord
    from llmdiff.store.writer import DumpWriter

    tmp_path.joinpath("p").mkdir()
    writer = DumpWriter(tmp_path / "p", shard_bytes=1000, queue_bytes=2000)
    for i in range(50):
        t = torch.full((100,), float(i))  # 400 bytes each
        writer.add(0, [(i, 0, "m", "M", i, "output", "", (100,), "float32", "cpu", None, None, 0, -1, True)], [t],
                   [{"min": float(i)}])
    writer.end_step(StepRecord(0, 0, None, 50))
    writer.close()
    dump = llmdiff.open_dump(tmp_path / "p")
    assert len(dump.entries) == 50 and len(list((tmp_path / "p").glob("shard-*"))) > 10
    assert dump.load(dump.entries[37]).tolist() == [37.0] * 100


def _reference_stats(t: torch.Tensor) -> dict:
    # float64 arithmetic, two passes: an independent reference for the fast reductions
    x = (torch.view_as_real(t) if t.is_complex() else t).reshape(-1).double()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "norm": None if x.numel() else 0.0,
                "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}
    return {"min": finite.min().item(), "max": finite.max().item(), "mean": finite.mean().item(),
            "std": finite.std(correction=0).item(), "norm": finite.norm().item(),
            "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}


def test_statistics_match_a_float64_reference():
    from llmdiff.capture.stats import CHUNK, GROUP_MAX, batch_stats, tensor_stats

    SEGMENT_MAX = 1 << 12

    torch.manual_seed(0)
    tensors = [torch.randn(5, 7), torch.randn(5, 7), torch.tensor([34519, 1, 9690]), torch.randn(3).to(torch.bfloat16),
               torch.empty(0), torch.tensor([1.0, float("nan"), 3.0, float("inf")]),
               torch.full((4,), 2.5, dtype=torch.float64), torch.tensor([True, False, True]),
               torch.randn(6, dtype=torch.complex64),
               torch.randn(SEGMENT_MAX + 1) * 1e-3 + 1.0,  # |mean| >> std: no cancellation in the spread
               torch.randn(3 * CHUNK + 17) * 2 + 5,  # several chunks
               torch.randn(CHUNK + 5).to(torch.bfloat16) - 3, torch.arange(CHUNK * 2),
               torch.full((9,), torch.finfo(torch.float32).min),  # attention masks: a float32 sum overflows
               torch.full((SEGMENT_MAX + 3,), torch.finfo(torch.float32).max),
               torch.randn(GROUP_MAX) * 1e-3 + 1.0, torch.randn(GROUP_MAX) * 1e-3 - 1.0,  # stacked together
               torch.randn(GROUP_MAX + 1) * 3 - 1, torch.ones(SEGMENT_MAX * 2)]
    batched = batch_stats(tensors)
    for t, got in zip(tensors, batched, strict=True):
        for stats in (got, tensor_stats(t)):
            want = _reference_stats(t)
            assert stats.keys() == want.keys()
            for key, value in want.items():
                if value is None:
                    assert stats[key] is None, key
                else:
                    assert stats[key] == pytest.approx(value, rel=2e-6, abs=1e-6 * (abs(want["mean"] or 0) + 1)), \
                        (tuple(t.shape), t.dtype, key)
    assert batched[-1]["std"] == 0.0


def test_statistics_of_stacked_rows_are_those_of_the_tensors():
    """Small copies kept as the rows of a matrix per dtype and shape (no tensor object each) give the statistics
    of the tensors themselves, NaN/Inf rows included, and the matrices are left as they were."""
    from llmdiff.capture.stats import BLOCK, batch_stats

    torch.manual_seed(1)
    halves = torch.randn(5, 3, 4).to(torch.bfloat16)
    halves[2, 1, 1] = float("inf")
    floats = torch.randn(7, 6) * 1e-3 + 4.0
    floats[3, 2] = float("nan")
    ints = torch.tensor([[34519, 1, 9690], [2, 2, 2]])
    many = torch.randn(BLOCK // 64 + 3, 64)  # more rows than one block
    loose = [torch.randn(6), torch.tensor([1.0, float("-inf")])]
    stacked_rows = [halves, floats, ints, many]
    # indices interleave the loose tensors and the rows of every matrix
    indices = [list(range(start, start + len(m))) for start, m in zip([2, 7, 14, 16], stacked_rows, strict=True)]
    tensors: list = [None] * (16 + len(many))
    tensors[0], tensors[1] = loose
    one_by_one: list = [None] * len(tensors)
    for matrix, where in zip(stacked_rows, indices, strict=True):
        for row, i in enumerate(where):
            one_by_one[i] = matrix[row].clone()
    one_by_one[0], one_by_one[1] = loose
    before = [m.clone() for m in stacked_rows]
    got = batch_stats(tensors, stacked=list(zip(stacked_rows, indices, strict=True)))
    assert got == batch_stats(one_by_one)
    assert got[2 + 2]["inf"] == 1 and got[7 + 3]["nan"] == 1 and got[14]["max"] == 34519.0
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, stacked_rows, strict=True))


def test_small_copies_of_any_dtype_or_class_keep_their_statistics(tmp_path):
    """Small statistics-only copies of plain tensors are rows of shared matrices; complex ones and tensor
    subclasses are cloned as themselves. Either way the statistics are the tensor's own."""
    from llmdiff.capture.stats import tensor_stats

    class Tagged(torch.Tensor):
        pass

    outputs = {"half": torch.randn(3, 5).to(torch.float16), "ints": torch.arange(12).reshape(3, 4),
               "flags": torch.tensor([True, False, True]), "complex": torch.randn(4, dtype=torch.complex64),
               "tagged": torch.randn(6).as_subclass(Tagged), "odd": torch.tensor([1.0, float("nan"), 2.0]),
               "strided": torch.randn(8, 6)[::2, 1:4]}

    class Emit(torch.nn.Module):
        def forward(self, x):
            return dict(outputs)

    with llmdiff.capture(Emit(), tmp_path / "r", mode="stats", steps="all") as run, torch.no_grad():
        for _ in range(2):
            run.model(torch.zeros(1))
    assert run.internal_errors == 0
    got = {e.path: e.stats for e in llmdiff.open_dump(tmp_path / "r").entries if e.part == "output" and e.step == 1}
    assert got.keys() == outputs.keys()
    for name, tensor in outputs.items():  # half precision is summed in float32 in a batch, float64 alone
        assert got[name] == pytest.approx(tensor_stats(tensor.as_subclass(torch.Tensor)), rel=1e-6), name


def test_rows_keep_every_copy_as_it_was_through_growth_and_reset():
    from llmdiff.capture.staging import Rows

    rows, tensors = Rows(), [torch.randn(2, 3) for _ in range(150)] + [torch.arange(4)]
    for index, tensor in enumerate(tensors):
        rows.copy(tensor, index)
    first = tensors[0].clone()
    tensors[0].add_(1)  # the model changes it in place after the copy
    got = {index: matrix[row] for matrix, owners in rows.stacked() for row, index in enumerate(owners)}
    assert sorted(got) == list(range(151)) and torch.equal(got[0], first)
    assert all(torch.equal(got[i], tensors[i]) for i in range(1, 151))
    rows.reset()
    rows.copy(tensors[3], 0)
    assert [(matrix.shape, owners) for matrix, owners in rows.stacked()] == [((1, 2, 3), [0])]
    rows.reset()  # the arange's shape was not copied since the last reset: its matrix is let go
    assert rows.stacked() == [] and rows.shapes() == [(torch.device("cpu"), torch.float32, (2, 3))]


def test_hashes_are_read_back_once_per_step(tmp_path, monkeypatch):
    """hash=True brings each step's tensors to the host in one transfer (the same code runs on CPU, and
    counts), and every hash is the one of the tensor alone, whatever its dtype, shape or layout."""
    from llmdiff.capture import stats
    from llmdiff.testing import tiny_llama

    odd = [torch.randn(3, 4), torch.zeros(0, 2), torch.tensor(True), torch.randn(5).to(torch.bfloat16),
           torch.arange(7)[::2], torch.randn(2, dtype=torch.complex64), torch.randn(2, 3).t()]
    one_by_one = [stats.content_hashes([t])[0] for t in odd]
    assert stats.content_hashes(odd) == one_by_one and len(set(one_by_one)) == len(odd)
    assert stats.content_hash(odd[0]) == one_by_one[0]
    model, ids = tiny_llama(layers=2), torch.tensor([[3, 17, 42, 99, 5]])
    reads = []
    real = stats.host_bytes
    monkeypatch.setattr(stats, "host_bytes", lambda flat: reads.append(flat.numel()) or real(flat))
    with llmdiff.capture(model, tmp_path / "d", steps="all", mode="stats", hash=True) as run, torch.no_grad():
        for _ in range(3):
            model(ids)
    entries = llmdiff.open_dump(tmp_path / "d").entries
    assert run.internal_errors == 0 and len(entries) > 50 and len(reads) == 3
    assert all(len(e.stats["hash"]) == 32 for e in entries)


def test_statistics_are_read_back_once_per_step(tmp_path, monkeypatch):
    # On an accelerator every read-back is a device synchronisation: statistics of a step's tensors stay
    # on the device and come back in one transfer (this runs the same code on CPU, and counts).
    from llmdiff.capture import stats
    from llmdiff.testing import tiny_llama

    model, ids = tiny_llama(layers=3), torch.tensor([[3, 17, 42, 99, 5]])
    reads = []
    real = stats.read_back
    monkeypatch.setattr(stats, "read_back", lambda table: reads.append(len(table)) or real(table))
    calls = {"item": 0, "tolist": 0}
    for name in calls:
        method = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _method=method):
            calls[_name] += 1
            return _method(self, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.no_grad():
        model(ids)
    baseline = dict(calls)
    with llmdiff.capture(model, tmp_path / "d", steps="all", mode="stats") as run, torch.no_grad():
        for _ in range(4):
            model(ids)
    dump = llmdiff.open_dump(tmp_path / "d")
    assert len(dump.steps) == 4 and len(dump.entries) > 100 and run.internal_errors == 0
    assert len(reads) == 4
    # per step: one statistics read-back and the step's token ids, whatever the number of tensors
    assert calls["item"] == 4 * baseline["item"]
    assert calls["tolist"] - 4 * baseline["tolist"] == 4 * 2


def test_batched_statistics_keep_integers_exact_beside_bf16():
    from llmdiff.capture.stats import batch_stats

    ids, hidden = torch.tensor([34519, 1, 9690]), torch.ones(3, dtype=torch.bfloat16)
    assert batch_stats([ids, hidden])[0]["max"] == 34519.0


@pytest.mark.parametrize("level", ["module", "mix"])
def test_writing_in_the_models_thread_or_in_the_background_gives_the_same_dump(model, prompt, tmp_path,
                                                                                monkeypatch, level):
    """Where no core is spare the writer runs in the model's thread: the dump must be the one the background
    writer gives, line for line and tensor for tensor."""
    from llmdiff.capture import session

    dumps = {}
    for background in (True, False):
        monkeypatch.setattr(session, "spare_cpu", lambda background=background: background)
        run = tmp_path / f"bg-{background}"
        with llmdiff.capture(model, run, steps="all", level=level) as cap:
            generate(model, prompt, 3)
        assert cap._writer is not None and cap._writer.background is background
        dumps[background] = llmdiff.open_dump(run)
    threaded, inline = dumps[True], dumps[False]
    assert not threaded.problems and not inline.problems
    assert [(s.step, s.entries, s.token_ids) for s in threaded.steps] == \
        [(s.step, s.entries, s.token_ids) for s in inline.steps]
    assert len(threaded.entries) == len(inline.entries) > 100
    for a, b in zip(threaded.entries, inline.entries, strict=True):
        assert (a.key, a.seq, a.shape, a.dtype, a.stats, a.data) == (b.key, b.seq, b.shape, b.dtype, b.stats, b.data)
        if a.data is not None:
            assert torch.equal(threaded.load(a), inline.load(b))


def test_a_failed_write_in_the_models_thread_never_reaches_the_model(model, prompt, tmp_path, monkeypatch):
    """Writing inline, a disk error is the capture's (counted, warned once), not the program's."""
    from llmdiff.capture import session
    from llmdiff.store import writer

    monkeypatch.setattr(session, "spare_cpu", lambda: False)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "serialize_file", full_disk)
    expected = generate(model, prompt, 3)
    cap = llmdiff.capture(model, tmp_path / "r", steps="all")
    with pytest.warns(llmdiff.LlmdiffWarning, match="capture error"):
        cap.start()
        got = generate(model, prompt, 3)
        with pytest.raises(LlmdiffError, match="No space left"):
            cap.stop()
    assert torch.equal(got, expected) and cap.internal_errors > 0


def test_a_step_keeps_few_objects_for_pythons_collector(tmp_path, monkeypatch):
    """What a step holds until its end costs the program's cycle collector: each object alive across many
    allocations is walked by its passes, and enough of them set off full passes over the whole program
    (measured: 4 of them, 0.9 s, in a 32-token op-level SmolLM2 run before this was cut). A pending entry is
    plain values (copies of distinct tensors: the next test). Writing makes no Entry object: a line is encoded
    from those values."""
    import gc

    from llmdiff.capture import session
    from llmdiff.store import writer
    from llmdiff.store.schema import Entry

    monkeypatch.setattr(session, "spare_cpu", lambda: False)  # the inline writer: its objects are this thread's
    chain = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(200)])  # 400 entries, one distinct tensor
    tracked: dict[str, int] = {}
    flush, encode = session.Capture._flush, writer.encode_lines
    lines = []

    def counting_flush(self):
        if self._pending and self.current_step == 1:  # step 0 made the per-module state (open-call lists)
            gc.collect(), gc.collect()  # the second pass untracks tuples whose inner tuples the first one did
            tracked["flush"] = len(gc.get_objects())
            tracked["pending"] = len(self._pending)
        flush(self)

    def counting_encode(records):
        lines.extend(records)
        tracked["entries_alive"] = max(tracked.get("entries_alive", 0), sum(type(o) is Entry for o in gc.get_objects()))
        return encode(records)

    monkeypatch.setattr(session.Capture, "_flush", counting_flush)
    monkeypatch.setattr(writer, "encode_lines", counting_encode)
    x = torch.randn(4, 8)
    with torch.no_grad(), llmdiff.capture(chain, tmp_path / "r", mode="stats", steps="all"):
        chain(x)
        gc.collect(), gc.collect()
        before = len(gc.get_objects())
        chain(x)
    assert tracked["pending"] == 402  # the Sequential's input and output, and each Identity's
    assert tracked["flush"] - before < 40, "a pending entry should not be an object Python's collector tracks"
    assert len(lines) >= 804 and tracked["entries_alive"] == 0
    dump = llmdiff.open_dump(tmp_path / "r")
    assert len(dump.entries) == 804 and {e.stats["max"] for e in dump.entries} == {x.max().item()}


def test_distinct_tensors_leave_no_object_per_entry_for_the_collector(tmp_path):
    """Many distinct tensors (op level): copies of small tensors are rows of shared matrices, the table of
    tensors seen forgets each one when it is freed, and neither views of the rows nor the manifest's records
    pile up while a step is written. (Objects Python's collector tracks, kept
    for a step, were carried into its oldest generation: full collections walking the whole heap, a tenth of
    an op-level capture's time.)"""
    import gc

    from llmdiff.capture import session as session_module
    from llmdiff.store import writer as writer_module
    from llmdiff.testing import tiny_llama

    model, ids = tiny_llama(layers=4), torch.tensor([[3, 17, 42, 99, 5]])
    survivors: dict[str, list[int]] = {"step": [], "writing": []}
    real_begin, real_end_step = session_module.Capture._outermost_call, session_module.Capture._end_step
    real_encode = writer_module.encode_lines

    def made_since_last_collection() -> int:
        """Tracked objects made since the last collection and alive (tuples aside: Python's collector lets go of
        those that hold plain values before they grow old)."""
        return sum(1 for o in gc.get_objects(generation=0) if type(o) is not tuple)

    def begin(self, module, args, kwargs):
        gc.collect()
        return real_begin(self, module, args, kwargs)

    def end_step(self, metadata=None):
        survivors["step"].append(made_since_last_collection())
        gc.collect()
        return real_end_step(self, metadata)

    def encode_lines(records):
        survivors["writing"].append(made_since_last_collection())
        return real_encode(records)

    was_enabled = gc.isenabled()
    gc.disable()  # collections happen only where this test asks for them
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(session_module.Capture, "_outermost_call", begin)
            mp.setattr(session_module.Capture, "_end_step", end_step)
            mp.setattr(writer_module, "encode_lines", encode_lines)
            with llmdiff.capture(model, tmp_path / "d", steps="all", mode="stats", level="op") as run, \
                    torch.no_grad():
                for _ in range(3):
                    model(ids)
    finally:
        if was_enabled:
            gc.enable()
    entries_per_step = run.entries / 3
    assert run.internal_errors == 0 and len(survivors["step"]) == 3 and entries_per_step >= 400
    # after the first step (which sets up the writer and the matrices): the model's own objects (its output) and
    # the capture's per-step state, not one an entry (before, two: a copy and a weak reference)
    assert max(survivors["step"][1:]) < entries_per_step / 5, (entries_per_step, survivors)
    # while writing: at most one encoding's records (before, every record and a view of every copy)
    assert max(survivors["writing"]) < writer_module.RECORDS_PER_ENCODE + entries_per_step / 5, \
        (entries_per_step, survivors)


def test_stored_copies_reach_the_host_through_reused_staging_blocks(tmp_path, monkeypatch):
    # On an accelerator a stored copy goes to the host asynchronously, into page-locked blocks that are
    # reused, and the writer waits once per batch, never per tensor. This machine has no accelerator: the
    # same code runs here on CPU tensors treated as device tensors (pageable blocks, no event to wait on).
    from llmdiff.capture import session
    from llmdiff.store import writer
    from llmdiff.testing import tiny_llama

    model, ids = tiny_llama(layers=3), torch.tensor([[3, 17, 42, 99, 5]])
    with llmdiff.capture(model, tmp_path / "direct", steps="all"), torch.no_grad():
        for _ in range(6):
            model(ids)
    monkeypatch.setattr(writer, "_on_device", lambda tensor: True)
    # the inline writer: a background one may still hold the first block when the next batch comes, and a
    # second block is then rightly made (on a loaded machine it was, one run in two)
    monkeypatch.setattr(session, "spare_cpu", lambda: False)
    moved = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(a) or real_to(self, *a, **k))
    with llmdiff.capture(model, tmp_path / "staged", steps="all") as run, torch.no_grad():
        for _ in range(6):
            model(ids)
        staging = run._writer.staging
    direct, staged = llmdiff.open_dump(tmp_path / "direct"), llmdiff.open_dump(tmp_path / "staged")
    assert len(staged.entries) == len(direct.entries) > 100 and run.internal_errors == 0
    for a, b in zip(direct.entries, staged.entries, strict=True):
        assert (a.key, a.stats) == (b.key, b.stats)
        if a.data:
            assert torch.equal(direct.load(a), staged.load(b))
    assert not [a for a in moved if a and str(a[0]) == "cpu"]  # no tensor brought over one by one
    # a block comes back once the shard holding its copies is on disk, and is handed out again
    assert staging is not None and staging.allocated == 1
    assert [block.users for block in staging._free] == [0]


def test_host_staging_reuses_blocks_and_keeps_each_copy_exact():
    from llmdiff.store.pinned import MIN_BLOCK, HostStaging

    staging = HostStaging(pin_memory=False, keep_bytes=MIN_BLOCK)
    tensors = [torch.randn(3, 4), torch.empty(0, 5), torch.tensor(2.5, dtype=torch.float64),
               torch.randn(4, 3).t(), torch.tensor([True, False]), torch.randn(5, dtype=torch.bfloat16)]
    copies, block, event = staging.stage(tensors)
    assert event is None and block.users == len(tensors)
    for copy, tensor in zip(copies, tensors, strict=True):
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and torch.equal(copy, tensor)
    assert len({c.data_ptr() % 64 for c in copies if c.numel()}) == 1  # each copy starts aligned
    for _ in copies[:-1]:
        staging.release(block)
    assert staging._free == []  # a copy still in use holds its block
    staging.release(block)
    _, block2, _ = staging.stage([torch.ones(10)])
    assert block2 is block and staging.allocated == 1
    _, block3, _ = staging.stage([torch.zeros(MIN_BLOCK // 4 + 1)])  # more bytes than a block: a bigger one
    assert block3.size == 2 * MIN_BLOCK and staging.allocated == 2
    staging.release(block3)
    assert staging._free == []  # beyond keep_bytes: freed, not kept



class _LargeOutput(torch.nn.Module):
    """A linear layer whose output is large (reduced when its hook fires, not copied); with ``nan``, one of its
    output columns is NaN; with ``change``, the output is overwritten in place after its hook."""

    def __init__(self, nan: bool, change: bool):
        super().__init__()
        self.lin = torch.nn.Linear(64, 512)
        self.change = change
        if nan:
            with torch.no_grad():
                self.lin.weight[3, 0] = float("nan")

    def forward(self, x):
        y = self.lin(x)  # [64, 512]: more than GROUP_MAX elements
        out = y * 2
        if self.change:
            y.fill_(1.0)
        return out


@pytest.mark.parametrize(("nan", "change"), [(False, False), (False, True), (True, False)])
def test_a_large_tensor_reduced_at_its_hook_gives_the_statistics_of_a_copy(tmp_path, nan, change):
    from llmdiff.capture.stats import GROUP_MAX

    torch.manual_seed(0)
    model, x = _LargeOutput(nan, change), torch.randn(64, 64)
    with torch.no_grad():
        y = model.lin(x)
    assert y.numel() > GROUP_MAX
    with llmdiff.capture(model, tmp_path / "hook", mode="stats") as run, torch.no_grad():
        model(x)
    assert run.internal_errors == 0
    # hash=True makes the capture copy every tensor, as it did for all before: the reference
    with llmdiff.capture(model, tmp_path / "copy", mode="stats", hash=True), torch.no_grad():
        model(x)
    at_hook, copied = llmdiff.open_dump(tmp_path / "hook"), llmdiff.open_dump(tmp_path / "copy")
    assert len(at_hook.entries) == len(copied.entries) == 4  # the root's and lin's input and output
    for a, b in zip(at_hook.entries, copied.entries, strict=True):
        assert a.key == b.key and a.note == b.note
        assert {k: v for k, v in a.stats.items() if k != "hash"} == pytest.approx(
            {k: v for k, v in b.stats.items() if k != "hash"}, rel=1e-6)
    lin = next(e for e in at_hook.entries if e.module == "lin" and e.part == "output")
    finite = y[y.isfinite()]
    assert lin.stats["max"] == pytest.approx(float(finite.max())) and lin.stats["nan"] == (64 if nan else 0)


def test_nan_in_a_large_tensor_changed_in_place_later_is_reported_unknown_not_miscounted(tmp_path):
    model = _LargeOutput(nan=True, change=True)  # the NaNs are gone when the step's statistics are counted
    with llmdiff.capture(model, tmp_path / "d", mode="stats", modules=["lin"], parts="outputs") as run, \
            torch.no_grad():
        out = model(torch.randn(64, 64))
    assert out.isnan().sum() == 64 and run.internal_errors == 0  # the program went on as without capture
    (entry,) = llmdiff.open_dump(tmp_path / "d").entries
    assert entry.stats["nan"] is None and entry.stats["max"] is None
    assert entry.note.startswith("statistics unknown: NaN/Inf")
    from llmdiff.store.summary import summarize

    assert summarize(llmdiff.open_dump(tmp_path / "d")).first_nonfinite == entry  # `llmdiff show` names it
    # no verdict is drawn from statistics that are not known: against a clean run it is not a pass
    clean = _LargeOutput(nan=False, change=True)
    clean.lin.load_state_dict(model.lin.state_dict() | {"weight": torch.zeros(512, 64)})
    with llmdiff.capture(clean, tmp_path / "clean", mode="stats", modules=["lin"], parts="outputs"), \
            torch.no_grad():
        clean(torch.randn(64, 64))
    (result,) = llmdiff.compare(tmp_path / "clean", tmp_path / "d").entries
    assert result.status == "not_comparable" and result.reason == entry.note
