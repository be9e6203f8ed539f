"""Read SGLang dumper files: ``<key>=<value>___...___name=<name>.pt`` (``forward_pass_id`` or ``step``,
``rank``, ``dump_index``, ``name``...), each holding a tensor or ``{"value": tensor, "meta": {...}}``.

A dumped tensor is a named point in the code, like ``llmdiff.save``: it becomes part ``save`` of the
module ``<name>``, step = the forward pass, call = its order among same-named dumps of that pass.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from llmdiff.errors import DumpError
from llmdiff.store.formats.common import close_steps, describe_or_report
from llmdiff.store.reader import Dump, ProcessDump
from llmdiff.store.schema import Entry

FORMAT = "sglang"
_FIELD = re.compile(r"^(?P<key>[A-Za-z_]+)=(?P<value>.*)$")


def parse_name(file_name: str) -> dict[str, str] | None:
    """The ``key=value`` fields of a dumper file name, or None when it is not one."""
    if not file_name.endswith(".pt"):
        return None
    fields = {}
    for part in file_name[:-3].split("___"):
        m = _FIELD.match(part)
        if not m:
            return None
        fields[m["key"]] = m["value"]
    return fields if "name" in fields else None


def _files(path: Path) -> list[Path]:
    return sorted(f for f in [*path.glob("*.pt"), *path.glob("*/*.pt")] if parse_name(f.name))


def is_sglang_dump(path: Path) -> bool:
    return bool(_files(path))


_INT = re.compile(r"-?[0-9]+")


def _int(value: str | None, default: int = 0) -> int:
    return int(value) if value is not None and _INT.fullmatch(value) else default


def open_sglang_dump(path: Path) -> Dump:
    """Open a folder of SGLang dumper files (or a folder of per-rank ``sglang_dump_*`` folders)."""
    files = _files(path)
    if not files:
        raise DumpError(f"{path}: no SGLang dumper files (step=...___name=....pt) found")
    problems: list[str] = []
    processes: dict[int, ProcessDump] = {}
    records = []
    for file in files:
        fields = parse_name(file.name)
        assert fields is not None
        step = _int(fields.get("forward_pass_id", fields.get("step")))
        records.append((_int(fields.get("rank")), step, _int(fields.get("dump_index"), 0), fields["name"], file))
    calls: Counter[tuple[int, int, str]] = Counter()
    for rank, step, _, name, file in sorted(records, key=lambda r: (r[0], r[1], r[2], r[4].name)):
        proc = processes.setdefault(rank, ProcessDump(path, {"format": FORMAT, "rank": rank}))
        tensors = describe_or_report(file, problems, path)
        call = calls[(rank, step, name)]
        calls[(rank, step, name)] += 1
        for key, shape, dtype in tensors:
            if key.startswith("meta"):
                continue
            proc.entries.append(Entry(
                seq=len(proc.entries), rank=rank, step=step, module=name, type="dump", call=call, part="save",
                path=key.removeprefix("value").lstrip("."), shape=shape, dtype=dtype, device="", stats=None,
                data={"file": file.relative_to(path).as_posix(), "key": key}, process=f"rank{rank}"))
    for rank, proc in processes.items():
        close_steps(proc, rank)
    return Dump(path, {"format": FORMAT}, list(processes.values()), problems, format=FORMAT)
