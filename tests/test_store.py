import json

import pytest
import torch

import llmdiff
from llmdiff.errors import DumpError, UsageError


@pytest.fixture
def dump_dir(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    with llmdiff.capture(model, tmp_path / "run", steps="all"), torch.no_grad():
        model(torch.ones(1, 3))
        model(torch.ones(1, 3))
    return tmp_path / "run"


def test_torn_line_partial_shard_and_unfinished_step_are_reported_not_trusted(dump_dir):
    proc = dump_dir / "proc0"
    (proc / "shard-000009.safetensors.partial").write_bytes(b"\x00" * 10)
    good = llmdiff.open_dump(dump_dir)
    last = good.entries[-1].to_json()
    with open(proc / "manifest.jsonl", "a") as f:
        f.write(json.dumps({**last, "seq": 99, "step": 2}) + "\n")  # a step that never finished
        f.write('{"kind": "entry", "seq": 100, "ran')  # torn by a kill
    dump = llmdiff.open_dump(dump_dir)
    assert len(dump.entries) == len(good.entries)
    text = "\n".join(dump.problems)
    assert "half-written shard ignored" in text
    assert "unreadable line ignored" in text
    assert "1 entries of an unfinished step ignored" in text


def test_missing_or_escaping_data_files_are_not_followed(dump_dir):
    proc = dump_dir / "proc0"
    lines = (proc / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["data"]["file"] = "../../../etc/passwd"
    lines[0] = json.dumps(record)
    (proc / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    dump = llmdiff.open_dump(dump_dir)
    first = dump.entries[0]
    assert first.data is None and first.note == "data file missing"
    assert any("data file missing, truncated, misnamed or outside the dump" in p for p in dump.problems)
    with pytest.raises(DumpError, match="only statistics were captured"):
        dump.load(first)


def test_not_a_dump(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DumpError, match="a dump is a folder, not a file"):
        llmdiff.open_dump(tmp_path / "f.txt")
    with pytest.raises(DumpError, match="not a dump llmdiff can read"):
        llmdiff.open_dump(tmp_path)


def test_the_one_expression_check_of_a_line_reads_what_the_field_by_field_check_reads(dump_dir):
    """Manifest lines are first checked in one expression; whatever it accepts must parse exactly as the
    field-by-field path does, and whatever that path refuses the fast one must refuse too."""
    import copy

    from llmdiff.store.schema import Entry, RecordError, _well_formed_entry

    lines = [json.loads(line) for line in (dump_dir / "proc0" / "manifest.jsonl").read_text().splitlines()]
    records = [r for r in lines if r["kind"] == "entry"]
    assert records
    edits = [("seq", "1"), ("seq", True), ("rank", None), ("shape", [1, -2]), ("shape", [1.0]), ("shape", "3"),
             ("module", 5), ("module", "caf\u00e9"), ("module", "\udfff"), ("stats", [1]), ("stats", {"min": [1]}),
             ("data", 5), ("data", {"file": 1, "key": "0"}), ("data", {"file": "s", "key": "\u00e9"}),
             ("note", 3), ("caller", "\u00e9"), ("device", None), ("type", None)]
    variants = [copy.deepcopy(r) for r in records]
    for key, value in edits:
        edited = copy.deepcopy(records[0])
        edited[key] = value
        variants.append(edited)
    for key in ("seq", "stats", "data", "shape", "module"):
        dropped = copy.deepcopy(records[0])
        del dropped[key]
        variants.append(dropped)
    fast_accepted = 0
    for record in variants:
        fast = _well_formed_entry(copy.deepcopy(record), "proc0")
        try:
            checked = Entry._checked(copy.deepcopy(record), "proc0")
        except RecordError:
            assert fast is None, record
            continue
        if fast is not None:
            fast_accepted += 1
            assert fast == checked, record
    assert fast_accepted >= len(records)


def test_a_small_shard_read_whole_gives_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmdiff.store.reader import _WholeShard

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(5),
               "d": torch.zeros(0, 4), "e": torch.tensor([True, False, True]), "f": torch.randn(2, 3).half()}
    save_file(tensors, tmp_path / "s.safetensors")
    shard = _WholeShard(tmp_path / "s.safetensors")
    expected = load_file(tmp_path / "s.safetensors")
    for key, tensor in expected.items():
        got = shard.get_tensor(key)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), key
    with pytest.raises(KeyError):
        shard.get_tensor("__metadata__")



def test_a_large_shard_maps_large_tensors_and_reads_the_rest(tmp_path, monkeypatch):
    """Tensors of MAP_BYTES and more are mapped (copy-on-write: writing to one leaves the file as it was),
    smaller or misaligned ones read (and any, where the file system cannot map files), all as the file holds
    them. A shard cut short after it was opened is a clear error, never a SIGBUS."""
    from llmdiff.store import reader

    monkeypatch.setattr(reader, "MAP_BYTES", 64)
    # laid out by hand, in this order: "odd" (3 bytes) puts the float32s of "next" at an offset no multiple of 4
    tensors = {"big": torch.randn(64, 33), "half": torch.randn(50).to(torch.bfloat16),
               "odd": torch.tensor([1, 2, 3], dtype=torch.uint8), "next": torch.randn(40), "small": torch.randn(3),
               "empty": torch.zeros(0, 4)}
    names = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    for key, tensor in tensors.items():
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "s.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    before = path.read_bytes()
    shard = reader._LargeShard(path)
    mapped: list[int] = []
    real_mmap = reader.mmap.mmap
    monkeypatch.setattr(reader.mmap, "mmap", lambda *a, **k: mapped.append(a[1]) or real_mmap(*a, **k))
    for key, tensor in tensors.items():
        got = shard.get_tensor(key)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), key
        got.add_(1) if got.is_floating_point() else got.fill_(7)  # the caller's tensor: writable
    assert len(mapped) == 2 and path.read_bytes() == before  # big and half mapped; the rest read
    def refused(*args, **kwargs):
        raise OSError(19, "No such device")  # what a file system that cannot map files answers

    monkeypatch.setattr(reader.mmap, "mmap", refused)
    assert torch.equal(shard.get_tensor("big"), tensors["big"])  # read instead
    with open(path, "r+b") as f:
        f.truncate(len(before) - 200)  # into "half", whose last bytes are now gone
    with pytest.raises(ValueError, match="shorter than its header says"):
        shard.get_tensor("half")


@pytest.mark.parametrize("frozen", [False, True])
def test_compare_leaves_the_cycle_collector_as_it_found_it(dump_dir, frozen):
    """A compare keeps what it read out of Python's collections while it runs (gc.freeze), and leaves the
    collector as it was: enabled, nothing frozen, or what the program itself froze still frozen."""
    import gc

    from llmdiff.gcpause import FULL_COLLECTIONS_HELD_OFF, collector_paused

    keep = [object() for _ in range(10)]
    if frozen:
        gc.freeze()
    before, thresholds = gc.get_freeze_count(), gc.get_threshold()
    try:
        report = llmdiff.compare(dump_dir, dump_dir)
        assert report.verdict == "match"
        json.loads(report.to_json())  # the report writers pause it too, and so does opening a dump
        assert llmdiff.open_dump(dump_dir).entries
        with pytest.raises(UsageError):
            llmdiff.compare(dump_dir)
        # nothing of the compare's stays frozen; what the program froze stays so (less what died since)
        assert gc.isenabled() and (gc.get_freeze_count() > 0) is frozen and gc.get_freeze_count() <= before
        assert gc.get_threshold() == thresholds
        with collector_paused():  # inside: full collections held off, unless the program froze objects itself
            held = gc.get_threshold()
        assert held == (thresholds if frozen else (*thresholds[:2], FULL_COLLECTIONS_HELD_OFF))
        assert gc.get_threshold() == thresholds
    finally:
        gc.unfreeze()
    del keep


def test_lines_encoded_together_are_the_lines_encoded_one_by_one():
    """The writer encodes a flush's lines in one orjson call and splits the array between its records: that
    must give the bytes of one call per line, whatever the names hold (quotes, braces, the separator itself,
    non-ASCII), and records orjson refuses (lone surrogates) still go through ``json``."""
    from llmdiff.store.schema import encode_line, encode_lines, entry_record

    names = ["model.layers.0.mlp", 'a,{"kind":"entry"}', "},{", "\\", "é 日本", "", 'x"y']
    stats = {"min": -1.5, "max": 3e38, "mean": 1e-7, "std": 0.0, "norm": 2.0, "nan": 0, "inf": 0, "hash": "ab"}
    data = {"file": "shard-000000.safetensors", "key": "7"}
    records = [entry_record(i, 0, 3, name, "Linear", i, "output", name, (1, i), "float32", "cpu",
                            stats if i % 2 else None, data if i % 3 else None, name or None, name if i % 4 else None)
               for i, name in enumerate(names * 3)]
    one_by_one = b"".join(encode_line(r) for r in records)
    assert encode_lines(records) == one_by_one
    assert one_by_one.count(b"\n") == len(records)
    assert encode_lines([]) == b""
    surrogate = [*records[:2], entry_record(99, 0, 0, "\udfff", "T", 0, "save", "", [], "float32", "cpu", None, None,
                                            None, None)]
    assert encode_lines(surrogate) == b"".join(encode_line(r) for r in surrogate)
    assert [json.loads(line)["seq"] for line in encode_lines(surrogate).splitlines()] == [0, 1, 99]

