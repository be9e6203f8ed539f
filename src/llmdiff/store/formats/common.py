"""What the file-per-tensor readers (msIT, vLLM, SGLang) share."""

from __future__ import annotations

from pathlib import Path

from llmdiff.errors import DumpError
from llmdiff.store.formats.torchfile import describe
from llmdiff.store.reader import ProcessDump, inside
from llmdiff.store.schema import StepRecord


def describe_or_report(file: Path, problems: list[str], root: Path) -> list[tuple[str, list[int], str]]:
    """The tensors in ``file`` (key, shape, dtype); an unreadable or refused file, or one whose path leads out
    of the dump folder ``root`` (a symlink), becomes a problem."""
    if not inside(file, root):
        problems.append(f"{file}: leads outside the dump folder (a symlink?); not read")
        return []
    try:
        return describe(file)
    except DumpError as exc:
        problems.append(str(exc))
        return []


def close_steps(proc: ProcessDump, rank: int) -> None:
    """Give ``proc`` one finished-step record per step its entries name (these formats have no step lines)."""
    counts: dict[int, int] = {}
    for entry in proc.entries:
        counts[entry.step] = counts.get(entry.step, 0) + 1
    proc.steps = [StepRecord(rank, step, None, n) for step, n in sorted(counts.items())]
