"""Read SGLang dumper files: ``<key>=<value>___...___name=<name>.pt`` (``forward_pass_id`` or ``step``,
``rank``, ``dump_index``, ``name``...), each holding a tensor or ``{"value": tensor, "meta": {...}}``.

Names of its non-intrusive mode (``DUMPER_NON_INTRUSIVE_MODE``) are module calls:
``non_intrusive__<module>.inputs.<i>`` → part ``input`` (``.inputs.<name>``: ``kwarg``), ``.output`` /
``.output.<i|field>`` → part ``output`` of ``<module>`` (``non_intrusive__inputs.*``/``output.*``: the root).
The batch's ``input_ids``, ``positions``, ``seq_lens`` and ``rids`` become the step's token and request
metadata (and stay entries too); ``meta`` (rank, world size, ``sglang_parallel_info``) goes into the
process info. Any other name is a named point in the code, like ``llmdiff.save``: part ``save`` of the
module ``<name>``. Step = the forward pass, call = its order among same-named dumps of that pass.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from llmdiff.errors import DumpError
from llmdiff.store.formats.common import close_steps, describe_or_report
from llmdiff.store.formats.torchfile import load_object
from llmdiff.store.reader import Dump, ProcessDump, inside
from llmdiff.store.schema import Entry, StepRecord

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


NON_INTRUSIVE = "non_intrusive__"
#: Per-batch dumps that describe the step's rows rather than a module.
BATCH_NAMES = ("input_ids", "positions", "seq_lens", "rids", "req_pool_indices")


def module_part(name: str) -> tuple[str, str, str] | None:
    """``non_intrusive__model.layers.0.mlp.inputs.0`` → ``("model.layers.0.mlp", "input", "0")``; None for a
    name that is not a module call (the last ``inputs``/``output`` segment splits module from argument)."""
    if not name.startswith(NON_INTRUSIVE):
        return None
    parts = name[len(NON_INTRUSIVE):].split(".")
    where = max((i for i, p in enumerate(parts) if p in ("inputs", "output")), default=None)
    if where is None:
        return None
    module, rest = ".".join(parts[:where]), ".".join(parts[where + 1:])
    if parts[where] == "output":
        return module, "output", rest
    if not rest:
        return None
    return module, "input" if rest.split(".")[0].isdigit() else "kwarg", rest


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
    calls: Counter[tuple[int, int, str, str, str]] = Counter()
    batch: dict[tuple[int, int], dict[str, Any]] = {}
    for rank, step, _, name, file in sorted(records, key=lambda r: (r[0], r[1], r[2], r[4].name)):
        proc = processes.setdefault(rank, ProcessDump(path, {"format": FORMAT, "rank": rank}))
        if name in BATCH_NAMES or "sglang_parallel_info" not in proc.info:
            _read_batch_info(file, path, name, batch.setdefault((rank, step), {}), proc, problems)
        tensors = describe_or_report(file, problems, path)
        where = module_part(name)
        module, part, arg = where if where is not None else (name, "save", "")
        call = calls[(rank, step, module, part, arg)]
        calls[(rank, step, module, part, arg)] += 1
        for key, shape, dtype in tensors:
            if key.startswith("meta"):
                continue
            inner = key.removeprefix("value").lstrip(".")
            proc.entries.append(Entry(
                seq=len(proc.entries), rank=rank, step=step, module=module, type="dump" if where is None else "",
                call=call, part=part, path=".".join(p for p in (arg, inner) if p), shape=shape, dtype=dtype,
                device="", stats=None, data={"file": file.relative_to(path).as_posix(), "key": key},
                process=f"rank{rank}"))
    for rank, proc in processes.items():
        close_steps(proc, rank)
        for record in proc.steps:
            _attach_requests(record, batch.get((rank, record.step), {}))
    return Dump(path, {"format": FORMAT}, list(processes.values()), problems, format=FORMAT)


def _read_batch_info(file: Path, root: Path, name: str, into: dict[str, Any], proc: ProcessDump,
                     problems: list[str]) -> None:
    """Keep a batch file's value (ids, positions, request ids) for the step line, and the dumper's ``meta``."""
    if not inside(file, root):
        return
    try:
        loaded = load_object(file)
    except DumpError:
        return  # reported when its tensors are described
    if not isinstance(loaded, dict):
        return
    meta = loaded.get("meta")
    if isinstance(meta, dict) and "sglang_parallel_info" not in proc.info:
        info = meta.get("sglang_parallel_info")
        proc.info.update(sglang_parallel_info=info if isinstance(info, dict) else {},
                         world_rank=meta.get("world_rank"), world_size=meta.get("world_size"),
                         models=[{"class": "", "engine": {"name": "sglang", "config": {}}}])
    if name in BATCH_NAMES:
        value = loaded.get("value")
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() == 1:
            into[name] = [int(v) for v in value.tolist()]
        elif isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            into[name] = [str(v) for v in value]
        else:
            problems.append(f"{file}: {name} is not a list of ids; step metadata incomplete")


def _attach_requests(record: StepRecord, batch: dict[str, Any]) -> None:
    """Rows → requests: the positions of a flattened batch restart for each request (in ``rids`` order)."""
    positions, rids = batch.get("positions"), batch.get("rids")
    record.token_ids = batch.get("input_ids")
    if positions is None or rids is None:
        return
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
    if len(starts) != len(rids):
        record.note = f"{len(rids)} requests but {len(starts)} runs of positions: rows not attributed"
        return
    record.positions = positions
    ends = [*starts[1:], len(positions)]
    record.requests = [{"id": rid, "arrival": None, "start": a, "rows": b - a, "computed": positions[a],
                        "prompt_tokens": None, "logits_row": i}
                       for i, (rid, a, b) in enumerate(zip(rids, starts, ends, strict=True))]
