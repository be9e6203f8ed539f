"""Markdown report: the answer first, then a summary table and one section per step."""

from __future__ import annotations

from llmdiff.compare.results import PASS, Comparison, EntryResult
from llmdiff.report.text import culprit_label, culprit_text, headline, num


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def _entry_row(e: EntryResult, columns: list[str]) -> list[str]:
    name = e.name if not e.target_source else f"{e.name} (golden: {e.golden_source}; target: {e.target_source})"
    return [name, e.status, *[num(e.metrics.get(m)) for m in columns], e.reason]


def render_markdown(c: Comparison, verbose: bool = False) -> str:
    """The full report. Without ``verbose`` the per-step sections list only entries that are not a pass."""
    lines = [f"# llmdiff: {c.verdict.upper()}", "", f"- golden: `{c.golden}`", f"- target: `{c.target}`", ""]
    lines += [f"- **{label}**: {text}" for label, text in headline(c)]
    lines.append("")
    if c.culprits:
        lines += ["## Culprits", ""]
        rows = [[str(i), culprit_label(k), str(k.call), str(k.step), num(k.score), num(k.input_error),
                 num(k.output_error), str(k.steps), "yes" if k.confirmed else "suspect", k.reason]
                for i, k in enumerate(c.culprits, 1)]
        lines += _table(["#", "module", "call", "step", "score", "input error", "output error", "steps",
                         "confirmed", "reason"], rows)
        lines.append("")
    if c.tokens.steps:
        lines += ["## Tokens", "", f"Logits: `{c.tokens.logits_entry or 'not captured'}`; budget: "
                  + ", ".join(f"{k} {num(v)}" for k, v in c.tokens.budget.items()), ""]
        rows = [[str(t.step), num(t.golden_token), num(t.target_token), num(t.inputs_match), num(t.kl_max),
                 num(t.top1_agree), num(t.golden_margin), num(t.logit_error),
                 "" if not t.flip else ("near-tie" if t.near_tie else "FLIP")] for t in c.tokens.steps]
        lines += _table(["step", "golden", "target", "same inputs", "KL", "top-1 agree", "golden margin",
                         "logit error", "flip"], rows)
        lines.append("")
    lines += ["## Summary", ""]
    lines += _table(["level", "total", "matching", "mismatched", "missing"],
                    [[r["level"], str(r["total"]), str(r["matching"]), str(r["mismatched"]), str(r["missing"])]
                     for r in c.summary_rows()])
    lines += ["", "Entries by status: " + ", ".join(f"{k} {v}" for k, v in c.counts.items() if v), ""]
    columns = list(c.metric_names)
    steps = sorted({(e.rank, e.step) for e in c.entries})
    for rank, step in steps:
        entries = [e for e in c.entries if (e.rank, e.step) == (rank, step)]
        shown = entries if verbose else [e for e in entries if e.status != PASS]
        failing = sum(1 for e in entries if e.status != PASS)
        lines += [f"## Step {step}" + (f" (rank {rank})" if len(steps) and rank else ""), "",
                  f"{len(entries)} entries, {failing} not passing.", ""]
        if shown:
            lines += _table(["entry", "status", *columns, "reason"], [_entry_row(e, columns) for e in shown])
            lines.append("")
    if c.notes or c.problems:
        lines += ["## Notes", ""] + [f"- {n}" for n in c.notes + c.problems] + [""]
    if c.culprits:
        lines += ["The top culprit: " + culprit_text(c.culprits[0]) + ".", ""]
    return "\n".join(lines)
