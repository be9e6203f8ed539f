"""CSV report: one row per compared key, every metric a column."""

from __future__ import annotations

import csv
import io

from llmdiff.compare.results import Comparison

FIXED = ("index", "rank", "step", "module", "call", "part", "path", "name", "type", "status", "reason",
         "golden_dtype", "target_dtype", "golden_shape", "target_shape", "kind", "logits", "error", "budget",
         "golden_source", "target_source")


def render_csv(c: Comparison) -> str:
    metric_columns: list[str] = []
    for e in c.entries:
        for name in e.metrics:
            if name not in metric_columns:
                metric_columns.append(name)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FIXED, *metric_columns])
    # From the entries' own fields, not their JSON records: the csv module writes NaN and Inf as the strings the
    # JSON records hold ("nan", "inf"), and making the records was half the time of a 31k-entry report.
    for e in c.entries:
        row = [getattr(e, k) for k in FIXED]
        row = ["x".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v) for v in row]
        metrics = e.metrics
        writer.writerow(row + ["" if metrics.get(m) is None else metrics[m] for m in metric_columns])
    return out.getvalue()
