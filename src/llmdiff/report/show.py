"""Terminal rendering of a dump summary (``llmdiff show``)."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table

from llmdiff.store.summary import DumpSummary, ModuleRow


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    ranges, start, prev = [], steps[0], steps[0]
    for s in [*steps[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ",".join(ranges)


def print_summary(summary: DumpSummary, console: Console) -> None:
    table = Table(title=f"{summary.path} ({summary.format})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("processes", ", ".join(summary.processes) or "none")
    table.add_row("steps", f"{_steps_text(summary.steps)} ({len(summary.steps)})")
    table.add_row("modules", str(summary.modules))
    table.add_row("entries", f"{summary.entries} ({summary.tensor_entries} with full tensors)")
    table.add_row("tensor data", human_bytes(summary.data_bytes))
    table.add_row("dtypes", ", ".join(f"{k} × {v}" for k, v in summary.dtypes.items()) or "none")
    if summary.requests:
        table.add_row("requests", f"{len(summary.requests)} (batched; rows per step attributed to requests)")
    first = summary.first_nonfinite
    if first is None:
        table.add_row("NaN/Inf", "[green]none[/]")
    else:
        stats = first.stats or {}
        table.add_row("NaN/Inf", f"[red]{summary.nonfinite_entries} entries; first: step {first.step} {first.name} "
                                 f"(nan={stats.get('nan')}, inf={stats.get('inf')})[/]")
    console.print(table)
    for problem in summary.problems:
        console.print(f"[yellow]warning:[/] {problem}", highlight=False)


def callers_text(callers: list[str | None]) -> str:
    """``model.layers.0.self_attn``, ``model.layers.1.self_attn``... → ``calls 0-29: model.layers.{0-29}.self_attn``."""
    known = [(i, c) for i, c in enumerate(callers) if c]
    if not known:
        return ""
    groups: list[tuple[str, list[int], list[int]]] = []  # (pattern, numbers, call indices)
    for call, name in known:
        match = re.fullmatch(r"(.*?\.)(\d+)(\..*|)", name)
        pattern, number = (f"{match[1]}{{}}{match[3]}", int(match[2])) if match else (name, -1)
        if groups and groups[-1][0] == pattern and number >= 0:
            groups[-1][1].append(number)
            groups[-1][2].append(call)
        else:
            groups.append((pattern, [number], [call]))
    parts = []
    for pattern, numbers, calls in groups:
        where = pattern.format("{" + _steps_text(sorted(set(numbers))) + "}") if numbers[0] >= 0 else pattern
        parts.append(f"call {_steps_text(calls)}: {where}")
    return "; ".join(parts)


def print_modules(rows: list[ModuleRow], console: Console) -> None:
    """The table of ``llmdiff show --list``: what each captured module recorded."""
    table = Table(title=f"{len(rows)} modules", title_justify="left")
    for column in ("module", "type", "steps", "calls/step", "entries", "parts: shape dtype", "called by"):
        table.add_column(column, overflow="fold")
    for row in rows:
        parts = "\n".join(f"{where} {list(shape)} {dtype}" for where, (shape, dtype) in row.parts.items())
        table.add_row(row.module or "<root>", row.type, str(row.steps), str(row.calls_per_step), str(row.entries),
                      parts, callers_text(row.callers))
    console.print(table)
