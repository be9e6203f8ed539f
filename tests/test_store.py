import json

import pytest
import torch

import llmdiff
from llmdiff.errors import DumpError


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
