"""Terminal rendering of a dump summary (``llmdiff show``)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from llmdiff.store.summary import DumpSummary


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
