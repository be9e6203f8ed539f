"""A self-contained HTML report: verdict first, two plots (inline SVG), a sortable table. No network needed."""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Sequence

from llmdiff.compare.results import PASS, Comparison, EntryResult
from llmdiff.report.text import culprit_label, headline, module_label, num

MAX_ROWS = 20000

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1b1b1b;max-width:1400px}
h1 .match{color:#1a7f37}h1 .diverged{color:#cf222e}h1 .incomplete{color:#9a6700}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #d0d7de;padding:3px 7px}
th{background:#f6f8fa;cursor:pointer;position:sticky;top:0}tr.fail td{background:#ffebe9}
tr.missing td{background:#fff8c5}.kv td:first-child{font-weight:600;white-space:nowrap}
.plot svg{max-width:100%;height:auto}code{background:#f6f8fa;padding:1px 4px}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.from(body.rows), asc = th.dataset.asc !== '1';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var fx = parseFloat(x), fy = parseFloat(y);
      var c = (!isNaN(fx) && !isNaN(fy)) ? fx - fy : x.localeCompare(y);
      return asc ? c : -c;
    });
    th.dataset.asc = asc ? '1' : '0';
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _svg(fig: object) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")  # type: ignore[attr-defined]
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _positive(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return max(value, 1e-12)


def error_by_module_plot(entries: Sequence[EntryResult], step: int, culprit: str | None) -> str:
    """Relative error of each module output, in execution order, for one step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outputs = [e for e in entries if e.step == step and e.part == "output" and e.error is not None
               and _positive(e.error) is not None and not e.logits]
    if not outputs:  # nothing on a log scale to draw (an empty or fully unpaired dump)
        return "<p>no compared module outputs to plot</p>"
    fig, ax = plt.subplots(figsize=(12, 3.6))
    xs = list(range(len(outputs)))
    ys = [max(e.error or 0.0, 1e-12) for e in outputs]
    colors = ["#cf222e" if e.status != PASS else "#0969da" for e in outputs]
    ax.plot(xs, ys, color="#8c959f", linewidth=0.8, zorder=1)
    ax.scatter(xs, ys, c=colors, s=10, zorder=2)
    budgets = [e.budget for e in outputs if e.budget]
    if budgets:
        ax.axhline(max(budgets), color="#cf222e", linestyle="--", linewidth=0.8, label="budget")
    for x, e in zip(xs, outputs, strict=True):
        if culprit is not None and e.module == culprit:
            ax.annotate(module_label(e.module), (x, _positive(e.error) or 1e-12), color="#cf222e", fontsize=8,
                        xytext=(5, 8), textcoords="offset points")
            break
    ax.set_yscale("log")
    ax.set_xlabel("module outputs in execution order")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"error by module, step {step}")
    ax.grid(True, which="major", alpha=0.3)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def heatmap_plot(entries: Sequence[EntryResult], max_modules: int = 400) -> str:
    """Largest output error per module (rows, execution order) and step (columns), log colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    modules: list[str] = []
    for e in entries:
        if e.part == "output" and e.error is not None and e.module not in modules:
            modules.append(e.module)
    modules = modules[:max_modules]
    steps = sorted({e.step for e in entries})
    if not modules or not steps:
        return "<p>No module outputs with element-wise errors to plot.</p>"
    row, col = {m: i for i, m in enumerate(modules)}, {s: i for i, s in enumerate(steps)}
    grid = np.full((len(modules), len(steps)), np.nan)
    for e in entries:
        value = _positive(e.error)
        if e.part == "output" and value is not None and e.module in row:
            i, j = row[e.module], col[e.step]
            grid[i, j] = value if np.isnan(grid[i, j]) else max(grid[i, j], value)
    finite = grid[~np.isnan(grid)]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.25 * len(steps)), min(24, 2 + 0.12 * len(modules))))
    norm = LogNorm(vmin=max(float(finite.min()), 1e-12), vmax=max(float(finite.max()), 1e-11)) if finite.size else None
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma_r", norm=norm)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    step_labels = max(1, len(modules) // 60)
    ax.set_yticks(range(0, len(modules), step_labels), [module_label(m) for m in modules[::step_labels]], fontsize=6)
    ax.set_xlabel("step")
    ax.set_title("largest output error per module and step")
    fig.colorbar(image, ax=ax, label="relative L2 error")
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            sort_key = ""
        else:
            sort_key = str(value) if math.isfinite(value) else ("1e308" if value > 0 else "-1e308")
        return f'<td data-v="{sort_key}">{html.escape(num(value))}</td>'
    return f"<td>{html.escape(num(value) if value is not None else '-')}</td>"


def render_html(c: Comparison) -> str:
    esc = html.escape
    culprit = c.culprits[0].module if c.culprits else None
    step = (c.culprits[0].step if c.culprits else c.first_divergence["step"] if c.first_divergence
            else min((e.step for e in c.entries), default=0))
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>llmdiff: ", esc(c.verdict),
             "</title><style>", _CSS, "</style></head><body>",
             f"<h1>llmdiff: <span class='{esc(c.verdict)}' id='verdict'>{esc(c.verdict.upper())}</span></h1>",
             f"<p>golden <code>{esc(c.golden)}</code> &nbsp; target <code>{esc(c.target)}</code></p>",
             "<table class='kv' id='headline'>"]
    parts += [f"<tr><td>{esc(label)}</td><td>{esc(text)}</td></tr>" for label, text in headline(c)]
    parts.append("</table>")
    if c.culprits:
        parts.append("<h2>Culprits</h2><table class='sortable' id='culprits'><thead><tr>")
        parts += [f"<th>{h}</th>" for h in ("#", "module", "call", "step", "score", "input error", "output error",
                                               "steps", "confirmed", "reason")]
        parts.append("</tr></thead><tbody>")
        for i, k in enumerate(c.culprits, 1):
            parts.append("<tr>" + "".join(_cell(v) for v in (i, culprit_label(k), k.call, k.step, k.score,
                                                              k.input_error, k.output_error, k.steps,
                                                              "yes" if k.confirmed else "suspect", k.reason))
                         + "</tr>")
        parts.append("</tbody></table>")
    parts += ["<h2>Error by module</h2><div class='plot'>", error_by_module_plot(c.entries, step, culprit),
              "</div><h2>Module &times; step</h2><div class='plot'>", heatmap_plot(c.entries), "</div>"]
    if c.tokens.steps:
        parts.append("<h2>Tokens</h2><table class='sortable' id='tokens'><thead><tr>")
        parts += [f"<th>{h}</th>" for h in ("step", "golden", "target", "same inputs", "KL", "top-1 agree",
                                               "golden margin", "logit error", "flip")]
        parts.append("</tr></thead><tbody>")
        for t in c.tokens.steps:
            flip = "" if not t.flip else ("near-tie" if t.near_tie else "FLIP")
            parts.append("<tr>" + "".join(_cell(v) for v in (t.step, t.golden_token, t.target_token, t.inputs_match,
                                                              t.kl_max, t.top1_agree, t.golden_margin, t.logit_error,
                                                              flip)) + "</tr>")
        parts.append("</tbody></table>")
    if c.notes or c.problems:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in c.notes + c.problems) + "</ul>")
    columns = list(c.metric_names)
    shown = c.entries if len(c.entries) <= MAX_ROWS else [e for e in c.entries if e.status != PASS][:MAX_ROWS]
    parts.append(f"<h2>Entries</h2><p>{len(shown)} of {len(c.entries)} entries (click a header to sort).</p>"
                 "<table class='sortable' id='entries'><thead><tr>")
    parts += [f"<th>{esc(h)}</th>" for h in ("#", "step", "entry", "status", *columns, "reason")]
    parts.append("</tr></thead><tbody>")
    for e in shown:
        css = "fail" if e.status not in (PASS, "missing_in_golden", "missing_in_target") else (
            "missing" if e.status != PASS else "")
        cells = [e.index, e.step, e.name, e.status, *[e.metrics.get(m) for m in columns], e.reason]
        parts.append(f"<tr class='{css}'>" + "".join(_cell(v) for v in cells) + "</tr>")
    parts.append("</tbody></table>")
    data = json.dumps({"verdict": c.verdict, "first_divergence": c.first_divergence,
                       "culprit": module_label(culprit) if culprit is not None else None})
    parts += [f"<script type='application/json' id='llmdiff-data'>{esc(data)}</script>",
              "<script>", _SORT_JS, "</script></body></html>"]
    return "".join(parts)
