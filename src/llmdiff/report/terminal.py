"""The short summary printed by ``llmdiff compare``: the answer, the culprits, the counts."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from llmdiff.compare.results import PASS, Comparison
from llmdiff.report.text import culprit_label, headline, num

_STYLE = {"match": "bold green", "diverged": "bold red", "incomplete": "bold yellow"}


def print_comparison(c: Comparison, console: Console, verbose: bool = False, top: int = 5) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for label, text in headline(c):
        head.add_row(label, f"[{_STYLE.get(c.verdict, 'bold')}]{text}[/]" if label == "verdict" else text)
    console.print(head)
    if c.culprits:
        table = Table(title="culprits (error introduced, not inherited)", title_justify="left")
        for col in ("#", "module", "step", "score", "in err", "out err", "steps", "reason"):
            table.add_column(col, overflow="fold")
        for i, k in enumerate(c.culprits[:top], 1):
            table.add_row(str(i), culprit_label(k) + ("" if k.confirmed else " (suspect)"), str(k.step),
                          num(k.score), num(k.input_error), num(k.output_error), str(k.steps), k.reason)
        console.print(table)
    if c.requests:
        table = Table(title="requests", title_justify="left")
        for col in ("#", "id", "prompt", "verdict", "points", "failing", "first flip", "culprit",
                    "max |dlogp|"):
            table.add_column(col, overflow="fold")
        for r in c.requests:
            flip = r["first_flip"]
            table.add_row(str(r["request"]), str(r.get("target_id") or r.get("golden_id") or "-"),
                          f"{r['prompt_tokens']} tokens", r["verdict"].upper(), str(r["points"]), str(r["failing"]),
                          "none" if flip is None else f"step {flip['step']}", r["culprit"] or "none",
                          num(r["max_logprob_diff"]))
        console.print(table)
    _print_counts(c, console, "entries")
    if verbose:
        _print_not_passing(c, console)
    _print_notes(c, console)


#: Beyond this many rows ``-v`` prints plain aligned columns: laying out a rich table costs ~0.75 ms a row
#: (22 s for the 29k failing entries of a decode compare held to a tight --rtol), plain lines ~2 µs.
RICH_ROWS = 500
_NOT_PASSING = ("step", "entry", "status", "rel_l2", "cosine", "max_abs", "reason")


def _print_not_passing(c: Comparison, console: Console) -> None:
    rows = [(str(e.step), e.name + (f" (target: {e.target_source})" if e.target_source else ""), e.status,
             num(e.metrics.get("rel_l2")), num(e.metrics.get("cosine")), num(e.metrics.get("max_abs")), e.reason)
            for e in c.entries if e.status != PASS]
    if len(rows) <= RICH_ROWS:
        table = Table(title="entries not passing", title_justify="left")
        for col in _NOT_PASSING:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(_NOT_PASSING[:-1])]
    console.print(f"entries not passing ({len(rows)})")
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in [_NOT_PASSING, *rows]]
    console.file.write("\n".join(lines) + "\n")


def print_weights(c: Comparison, console: Console, top: int = 10) -> None:
    """``llmdiff weights``: the verdict, then the worst tensors first."""
    style = _STYLE.get(c.verdict, "bold")
    console.print(f"[bold]verdict[/]  [{style}]{c.verdict.upper()}[/]   {c.golden}  vs  {c.target}")
    table = Table(title=f"worst {min(top, len(c.entries))} of {len(c.entries)} tensors", title_justify="left")
    for col in ("#", "tensor", "shape", "dtypes", "rel_l2", "max_abs", "cosine", "status"):
        table.add_column(col, overflow="fold")
    for i, e in enumerate(c.entries[:top], 1):
        name = f"{e.module}.{e.path}" if e.module else e.path
        dtypes = "/".join(d for d in (e.golden_dtype, e.target_dtype) if d)
        table.add_row(str(i), name, "x".join(map(str, e.golden_shape or e.target_shape or [])), dtypes,
                      num(e.metrics.get("rel_l2")), num(e.metrics.get("max_abs")), num(e.metrics.get("cosine")),
                      e.status if e.status == PASS else f"[red]{e.status}[/]")
    console.print(table)
    _print_counts(c, console, "tensors")
    _print_notes(c, console)


def _print_counts(c: Comparison, console: Console, label: str) -> None:
    counts = c.counts
    if not counts["total"]:
        console.print(f"{label}: none")
        return
    console.print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "total")
                  + f" (of {counts['total']})")


def _print_notes(c: Comparison, console: Console) -> None:
    for note in c.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
    for problem in c.problems:
        console.print(f"[yellow]warning:[/] {problem}", highlight=False)
