"""What a dump holds, in numbers: the data behind ``llmdiff show``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llmdiff.store.reader import Dump
from llmdiff.store.schema import Entry


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
    problems: list[str] = field(default_factory=list)


def _nonfinite(entry: Entry) -> bool:
    stats = entry.stats or {}
    return bool(stats.get("nan") or stats.get("inf"))


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
        problems=list(dump.problems),
    )
