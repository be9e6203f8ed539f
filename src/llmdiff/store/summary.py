"""What a dump holds, in numbers: the data behind ``llmdiff show``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llmdiff.store.reader import Dump
from llmdiff.store.schema import Entry, stats_unknown


@dataclass
class DumpSummary:
    path: str
    format: str
    processes: list[str]
    steps: list[int]
    modules: int
    entries: int
    tensor_entries: int
    data_bytes: int
    dtypes: dict[str, int]
    first_nonfinite: Entry | None
    nonfinite_entries: int
    token_ids: dict[int, list[object] | None] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # engine request ids, in arrival order
    problems: list[str] = field(default_factory=list)


def _nonfinite(entry: Entry) -> bool:
    stats = entry.stats or {}
    return bool(stats.get("nan") or stats.get("inf")) or stats_unknown(entry.stats)


def _request_ids(dump: Dump) -> list[str]:
    arrival: dict[str, int] = {}
    for step in dump.steps:
        for request in step.requests or []:
            order = request.get("arrival") if isinstance(request, dict) else None
            if isinstance(order, int):
                arrival.setdefault(str(request.get("id")), order)
    return sorted(arrival, key=lambda r: arrival[r])


def summarize(dump: Dump) -> DumpSummary:
    """Count what ``dump`` holds and find the first entry, in execution order, with a NaN or Inf."""
    entries = dump.entries
    bad = [e for e in entries if _nonfinite(e)]
    files = {dump.data_file(e) for e in entries if e.data}
    data_bytes = sum(path.stat().st_size for path in files if path is not None and path.is_file())
    return DumpSummary(
        path=str(dump.path),
        format=dump.format,
        processes=[p.folder.name for p in dump.processes],
        steps=sorted({s.step for s in dump.steps} | {e.step for e in entries}),
        modules=len({e.module for e in entries}),
        entries=len(entries),
        tensor_entries=sum(1 for e in entries if e.data),
        data_bytes=data_bytes,
        dtypes=dict(Counter(e.dtype for e in entries).most_common()),
        first_nonfinite=min(bad, key=lambda e: (e.rank, e.step, e.seq)) if bad else None,
        nonfinite_entries=len(bad),
        token_ids={s.step: s.token_ids for s in dump.steps if s.rank == 0},
        requests=_request_ids(dump),
        problems=list(dump.problems),
    )


@dataclass
class ModuleRow:
    """One captured module (or op) of a dump, for ``llmdiff show --list``."""

    module: str
    type: str
    steps: int
    calls_per_step: int
    entries: int
    parts: dict[str, tuple[list[int], str]]  # "input.0" -> (shape, dtype) of its first entry
    callers: list[str | None]  # by call index, for a module shared by several callers


def module_rows(entries: list[Entry]) -> list[ModuleRow]:
    """One row per module in order of first execution: steps seen, calls per step, parts with shape and dtype."""
    rows: dict[str, ModuleRow] = {}
    steps: dict[str, set[tuple[int, int]]] = {}
    calls: dict[tuple[str, int, int], set[int]] = {}
    for e in sorted(entries, key=lambda e: (e.rank, e.step, e.seq)):
        row = rows.get(e.module)
        if row is None:
            row = rows[e.module] = ModuleRow(e.module, e.type, 0, 0, 0, {}, [])
            steps[e.module] = set()
        row.entries += 1
        steps[e.module].add((e.rank, e.step))
        calls.setdefault((e.module, e.rank, e.step), set()).add(e.call)
        where = e.part if not e.path else f"{e.part}.{e.path}"
        row.parts.setdefault(where, (e.shape, e.dtype))
        if e.caller is not None:
            while len(row.callers) <= e.call:
                row.callers.append(None)
            row.callers[e.call] = row.callers[e.call] or e.caller
    for (module, _, _), seen in calls.items():
        rows[module].calls_per_step = max(rows[module].calls_per_step, len(seen))
    for module, row in rows.items():
        row.steps = len({step for _, step in steps[module]})
        if row.callers:  # a shared module: the calls its own parent made are not marked in the dump
            parent = module.rpartition(".")[0]
            row.callers = [c or parent for c in row.callers]
    return list(rows.values())
