"""Damaged, hand-edited or hostile dumps: a clear error or a listed problem, never a traceback or a hang,
never exit 1 for a crash, never a silent pass; reports never touch their inputs.

The reproduced defects each have a test; then a seeded fuzz test corrupts real small dumps of every
layout llmdiff reads and runs ``show`` and ``compare`` on each.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import llmdiff
from llmdiff.cli import INTERNAL_ERROR, main
from llmdiff.testing import generate, tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"
EXIT_CODES = {0, 1, 2}  # match, diverged/incomplete, bad input; INTERNAL_ERROR (3) would be a bug


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden") / "g"
    model = tiny_llama()
    with llmdiff.capture(model, root, steps="all"):
        generate(model, torch.tensor([[1, 2, 3, 4]]), 2)
    return root


@pytest.fixture
def damaged(golden: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "d"
    shutil.copytree(golden, copy)
    return copy


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def fail(signum: int, frame: object) -> None:
        raise TimeoutError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run the llmdiff command in this process; its exit code and what it printed."""
    with deadline(60):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clean(code: int, text: str) -> None:
    assert code in EXIT_CODES, text[-2000:]
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]


def edit_manifest(dump: Path, edit: Callable[[list[str]], list[str]]) -> None:
    manifest = dump / "proc0" / "manifest.jsonl"
    manifest.write_text("\n".join(edit(manifest.read_text().splitlines())) + "\n")


# -- the reproduced defects -------------------------------------------------------------------------------
@pytest.mark.parametrize("edit", [
    lambda line: line.replace('"seq":0', '"seq":"x"', 1),
    lambda line: line.replace('"rank":0,', "", 1),
    lambda line: line.replace('"dtype":"int64",', "", 1),
    lambda line: line.replace('"seq":0', '"seq":1e400', 1),
    lambda line: line.replace('"data":{', '"data":5,"x":{', 1),
    lambda line: line.replace('"file":"shard-000000.safetensors"', '"file":["a"]', 1),
    lambda line: line.replace('"key":"0"', '"key":{"a":1}', 1),
    lambda line: line.replace('"stats":{', '"stats":[1],"y":{', 1),
], ids=["seq-str", "rank-missing", "dtype-missing", "int-overflow", "data-int", "file-list", "key-dict",
        "stats-list"])
def test_a_bad_manifest_line_is_a_listed_problem(damaged, golden, tmp_path, capsys, edit):
    edit_manifest(damaged, lambda lines: [edit(lines[0]), *lines[1:]])
    code, text = cli(capsys, "show", damaged)
    assert_clean(code, text)
    assert code == 0 and "manifest.jsonl:1" in text
    code, text = cli(capsys, "compare", golden, damaged, "-o", tmp_path / "r.md", "-o", tmp_path / "r.html")
    assert_clean(code, text)
    assert code == 1  # an entry fewer on one side: never a silent pass


def test_a_lone_surrogate_is_spelled_out_in_every_report(damaged, golden, tmp_path, capsys):
    edit_manifest(damaged, lambda lines: [lines[0].replace('"module":""', '"module":"\\udfff\\ud800"', 1),
                                          *lines[1:]])
    assert "\\udfff" in llmdiff.open_dump(damaged).entries[0].module
    reports = [tmp_path / f"r.{ext}" for ext in ("md", "csv", "json", "html")]
    code, text = cli(capsys, "compare", golden, damaged, *[a for r in reports for a in ("-o", r)])
    assert_clean(code, text)
    assert code == 1 and all("\\udfff" in r.read_text(encoding="utf-8") for r in reports)


@pytest.mark.parametrize("line", ['{"kind":"step","rank":0,"step":9,"token_ids":null,"entries":null}',
                                  '{"kind":"step","rank":0,"step":9}', "[" * 100000 + "]" * 100000])
def test_bad_step_lines_and_deep_nesting(damaged, capsys, line):
    edit_manifest(damaged, lambda lines: [*lines, line])
    code, text = cli(capsys, "show", damaged)
    assert_clean(code, text)
    assert "manifest.jsonl:" in text


@pytest.mark.parametrize("name", ["run.json", "proc0/process.json"])
def test_side_files_that_are_not_utf8_or_are_fifos(damaged, golden, capsys, name):
    (damaged / name).write_bytes(b"\xff\xfe")
    code, text = cli(capsys, "show", damaged)
    assert_clean(code, text)
    assert "unreadable" in text
    (damaged / name).unlink()
    os.mkfifo(damaged / name)
    for args in (("show", damaged), ("compare", golden, damaged)):
        code, text = cli(capsys, *args)  # a blocking read would trip the deadline
        assert_clean(code, text)
        assert "not a regular file" in text


def test_an_empty_manifest_gives_an_html_report(damaged, golden, tmp_path, capsys):
    (damaged / "proc0" / "manifest.jsonl").write_text("")
    code, text = cli(capsys, "compare", golden, damaged, "-o", tmp_path / "r.html")
    assert_clean(code, text)
    assert code == 1 and (tmp_path / "r.html").read_text().count("INCOMPLETE") >= 1


@pytest.mark.parametrize("name", ["forward_pass_id=--5___name=h.pt", "rank=²___name=h.pt"])
def test_odd_sglang_file_names(tmp_path, capsys, name):
    folder = tmp_path / "sg"
    folder.mkdir()
    torch.save(torch.ones(2), folder / name)
    code, text = cli(capsys, "show", folder)
    assert_clean(code, text)
    assert code == 0


def test_msit_tree_and_msprobe_construct_and_shapes(tmp_path, capsys):
    msit = tmp_path / "msit"
    shutil.copytree(FIXTURES / "msit_tensor", msit)
    (tree,) = msit.rglob("model_tree.json")
    tree.write_text('{"name": "root", "children": 5}')
    code, text = cli(capsys, "show", msit)
    assert_clean(code, text)
    probe = tmp_path / "msprobe"
    shutil.copytree(FIXTURES / "msprobe_statistics", probe)
    (construct,) = probe.rglob("construct.json")
    data = json.loads(construct.read_text())
    construct.write_text(json.dumps({k: [v] for k, v in data.items()}))
    (dump_json,) = probe.rglob("dump.json")
    text_json = dump_json.read_text()
    dump_json.write_text(text_json.replace('"shape": [', '"shape": [null, ', 1))
    code, text = cli(capsys, "show", probe)
    assert_clean(code, text)
    assert "is not a list of sizes" in text


def test_an_internal_error_exits_with_its_own_code(golden, capsys, monkeypatch):
    import llmdiff.api

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(llmdiff.api, "compare_dumps", broken)
    code, text = cli(capsys, "compare", golden, golden)
    assert code == INTERNAL_ERROR != 1
    assert "internal error: ZeroDivisionError: boom" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["g/run.json", "t/", "g/proc0/report.md", "t/sub/r.csv"])
def test_a_report_never_writes_into_an_input(golden, tmp_path, capsys, where):
    g, t = tmp_path / "g", tmp_path / "t"
    shutil.copytree(golden, g)
    shutil.copytree(golden, t)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    flag = "--json" if where.endswith(".json") else "-o"
    code, text = cli(capsys, "compare", g, t, flag, tmp_path / where)
    assert code == 2 and "lies inside the input dump" in text
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_lost_tensor_data_makes_the_verdict_incomplete(damaged, golden, capsys):
    (shard,) = sorted((damaged / "proc0").glob("shard-*.safetensors"))[:1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    code, text = cli(capsys, "compare", golden, damaged)
    assert_clean(code, text)
    assert code == 1 and "INCOMPLETE" in text and "lost their tensor data" in text
    code, text = cli(capsys, "compare", golden, damaged, "--allow-missing")
    assert code == 0 and "lost their tensor data" in text


def test_symlinks_out_of_the_dump_are_refused(damaged, golden, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.copytree(golden / "proc0", outside)
    for shard in (damaged / "proc0").glob("shard-*.safetensors"):
        shard.unlink()
        shard.symlink_to(outside / shard.name)
    (damaged / "run.json").unlink()
    (damaged / "run.json").symlink_to(golden / "run.json")
    code, text = cli(capsys, "compare", golden, damaged)
    assert_clean(code, text)
    assert code == 1 and "leads outside the dump folder" in " ".join(text.split())
    shutil.rmtree(damaged / "proc0")
    (damaged / "proc0").symlink_to(outside, target_is_directory=True)
    code, text = cli(capsys, "show", damaged)
    assert_clean(code, text)
    assert "leads outside the dump folder" in " ".join(text.split())


# -- the fuzz test ----------------------------------------------------------------------------------------
def _mutations(rng: random.Random) -> Iterator[tuple[str, str, Callable[[Path], None]]]:
    """(name, kind, apply): kind "data" damages entries or tensors (compare must not pass), "side" does not."""
    junk = [b"", b"\x00" * 7, b"\xff\xfe\xfd", b"{", b"[]", b"null", b'{"a": ' * 3000, "\udfff".encode("utf-8",
            "surrogatepass"), json.dumps({"kind": "entry"}).encode()]
    values: list[object] = [None, "x", -1, 1e400, [], {}, [None], 2**70, True, "\udfff"]

    def field_edit(line_no: int, key: str, value: object) -> Callable[[Path], None]:
        def apply(dump: Path) -> None:
            manifest = dump / "proc0" / "manifest.jsonl"
            lines = manifest.read_text().splitlines()
            i = line_no % len(lines)
            record = json.loads(lines[i])
            if value == "<delete>":
                record.pop(key, None)
            else:
                record[key] = value
            lines[i] = json.dumps(record)
            manifest.write_text("\n".join(lines) + "\n")
        return apply

    def file_edit(pattern: str, content: bytes | None, truncate: bool = False) -> Callable[[Path], None]:
        def apply(dump: Path) -> None:
            files = sorted(p for p in dump.rglob(pattern) if p.is_file())
            if not files:
                return
            target = files[rng.randrange(len(files))]
            if truncate:
                target.write_bytes(target.read_bytes()[: rng.randrange(max(1, target.stat().st_size))])
            elif content is None:
                target.unlink()
            else:
                target.write_bytes(content)
        return apply

    keys = ["seq", "rank", "step", "module", "type", "call", "part", "path", "shape", "dtype", "stats", "data",
            "kind", "token_ids", "entries", "requests", "positions", "note", "caller"]
    for i in range(150):
        key = rng.choice(keys)
        value = rng.choice([*values, "<delete>"])
        yield f"manifest-{i}-{key}={str(value)[:12]}", "data", field_edit(rng.randrange(1000), key, value)
    for i in range(30):
        splice = functools.partial(_splice, junk=rng.choice(junk), line_no=rng.randrange(50))
        yield f"manifest-bytes-{i}", "data", splice
    for i in range(30):
        yield f"shard-{i}", "data", file_edit("shard-*.safetensors", rng.choice([None, *junk]), truncate=i % 2 == 0)
    for i in range(30):
        yield f"side-{i}", "side", file_edit(rng.choice(["run.json", "process.json"]), rng.choice([None, *junk]))


def _splice(dump: Path, junk: bytes, line_no: int) -> None:
    manifest = dump / "proc0" / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines()
    lines[line_no % len(lines)] = junk
    manifest.write_bytes(b"\n".join(lines) + b"\n")


def foreign_layouts(root: Path) -> dict[str, Path]:
    """Small real dumps in the four foreign layouts llmdiff reads."""
    from test_formats import write_vllm_layout

    root.mkdir(parents=True)
    layouts = {"msit": root / "msit", "msprobe": root / "msprobe", "msprobe-mix": root / "msprobe-mix"}
    shutil.copytree(FIXTURES / "msit_tensor", layouts["msit"])
    shutil.copytree(FIXTURES / "msprobe_tensor", layouts["msprobe"])
    shutil.copytree(FIXTURES / "msprobe_mix_statistics", layouts["msprobe-mix"])
    model = tiny_llama()
    with llmdiff.capture(model, root / "ours", steps="all", modules=[r"layers\.0\.mlp"]):
        generate(model, torch.tensor([[1, 2, 3]]), 1)
    layouts["vllm"] = write_vllm_layout(root / "ours", root / "vllm")
    sg = layouts["sglang"] = root / "sglang"
    sg.mkdir()
    for step in range(2):
        torch.save({"value": torch.randn(2, 4), "meta": {}}, sg / f"forward_pass_id={step}___rank=0___name=h.pt")
    return layouts


def _foreign_mutations(rng: random.Random, root: Path) -> Iterator[tuple[str, Path]]:
    """Copies of real msIT and msProbe dumps and of vLLM and SGLang layouts with one file damaged."""
    layouts = foreign_layouts(root / "layouts")
    junk = [b"", b"\xff\xfe", b"{", b"[1, 2]", b'{"data": 5}', b'{"name": "root", "children": [5, {"children": 7}]}',
            b"PK\x03\x04" + b"\x00" * 20, b"\x80\x02}q\x00."]
    for i in range(80):
        name, source = rng.choice(sorted(layouts.items()))
        copy = root / f"{name}-{i}"
        shutil.copytree(source, copy, symlinks=True)
        files = sorted(p for p in copy.rglob("*") if p.is_file())
        target = files[rng.randrange(len(files))]
        choice = rng.randrange(3)
        if choice == 0:
            target.write_bytes(rng.choice(junk))
        elif choice == 1:
            target.write_bytes(target.read_bytes()[: rng.randrange(max(1, target.stat().st_size))])
        else:
            target.unlink()
        yield f"{name}-{i}-{target.name}", copy


def test_fuzz_damaged_dumps(golden, tmp_path, capsys):
    rng = random.Random(20261203)
    cases = 0
    findings: list[str] = []
    for name, kind, apply in _mutations(rng):
        dump = tmp_path / f"case-{cases}"
        shutil.copytree(golden, dump)
        apply(dump)
        for args in (("show", dump), ("compare", golden, dump, "-o", tmp_path / "r.html")):
            code, text = cli(capsys, *args)
            if code not in EXIT_CODES or "Traceback" in text or "internal error" in text:
                findings.append(f"{name}: {args[0]} exit {code}: {text.strip()[-300:]}")
            elif args[0] == "compare" and kind == "data" and code == 0 and not _same(golden, dump):
                findings.append(f"{name}: compare passed a dump that lost data")
        shutil.rmtree(dump)
        cases += 1
    for name, dump in _foreign_mutations(rng, tmp_path / "foreign"):
        for args in (("show", dump), ("compare", dump, dump)):
            code, text = cli(capsys, *args)
            if code not in EXIT_CODES or "Traceback" in text or "internal error" in text:
                findings.append(f"{name}: {args[0]} exit {code}: {text.strip()[-300:]}")
        cases += 1
    assert cases >= 300
    assert not findings, "\n".join(findings[:20])


def _same(golden: Path, dump: Path) -> bool:
    """Whether a damaged dump still reads back entry for entry, tensors included (a mutation that changed nothing)."""
    g, d = llmdiff.open_dump(golden), llmdiff.open_dump(dump)
    if [e.key for e in g.entries] != [e.key for e in d.entries] or d.problems:
        return False
    return all((a.data is None) == (b.data is None) for a, b in zip(g.entries, d.entries, strict=True))


def test_symlinks_out_of_a_foreign_dump_are_refused(tmp_path, capsys):
    msit = tmp_path / "msit"
    shutil.copytree(FIXTURES / "msit_tensor", msit)
    outside = tmp_path / "outside.pth"
    torch.save(torch.ones(3), outside)
    victim = next(p for p in sorted(msit.rglob("*.pth")) if p.name.startswith("output"))
    victim.unlink()
    victim.symlink_to(outside)
    code, text = cli(capsys, "show", msit)
    assert_clean(code, text)
    assert "leads outside the dump folder" in " ".join(text.split())
    probe = tmp_path / "msprobe"
    shutil.copytree(FIXTURES / "msprobe_tensor", probe)
    (dump_json,) = probe.rglob("dump.json")
    shutil.copy(dump_json, tmp_path / "dump.json")
    dump_json.unlink()
    dump_json.symlink_to(tmp_path / "dump.json")
    code, text = cli(capsys, "show", probe)
    assert_clean(code, text)
    assert "leads outside the dump folder" in " ".join(text.split())
