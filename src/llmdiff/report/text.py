"""Small formatting helpers shared by the renderers (numbers, names, the headline)."""

from __future__ import annotations

import math
from typing import Any

from llmdiff.compare.results import PASS, Comparison, Culprit


def num(value: Any, digits: int = 3) -> str:
    """A metric value for humans: 3 significant digits, inf/nan spelled out, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits + 1}g}"
    return f"{value:.{digits - 1}e}"


def module_label(module: str) -> str:
    return module or "<root>"


def ranks_label(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def culprit_label(c: Culprit) -> str:
    """The culprit's module; in a cross-engine compare as the target engine names it, when that differs; in
    a tensor-parallel compare with the ranks whose shards carry the error."""
    label = module_label(c.module)
    if c.target_module and c.target_module != c.module:
        label = f"{c.target_module} (= {label})"
    if c.ranks:
        label += " on " + ranks_label(c.ranks)
    return label


def culprit_text(c: Culprit) -> str:
    status = "" if c.confirmed else " (suspect)"
    where = f"call {c.call}, step {c.step}" + (f", requests {', '.join(map(str, c.requests))}"
                                               if c.requests is not None else "")
    return (f"{culprit_label(c)} ({where}){status}: {c.reason}; input error "
            f"{num(c.input_error)} -> output error {num(c.output_error)}")


def flip_text(comparison: Comparison) -> str | None:
    flip = comparison.tokens.first_flip
    if flip is None:
        return None
    if flip.get("golden_token") is None:
        return f"generation parts after step {flip['step']} (the fed tokens differ; no logits captured)"
    kind = {True: "a near-tie, consistent with precision noise", False: "a real departure",
            None: "margin unknown"}[flip.get("near_tie")]
    return (f"step {flip['step']}: golden token {flip['golden_token']} vs target {flip['target_token']}, "
            f"golden margin {num(flip['golden_margin'])} (logit error {num(flip['logit_error'])}): {kind}")


def headline(comparison: Comparison) -> list[tuple[str, str]]:
    """The answer first: verdict, token flip, first divergence, top culprit — as (label, text) rows."""
    c = comparison
    rows = [("verdict", c.verdict.upper())]
    tokens = c.tokens
    if tokens.steps:
        budget = tokens.first_out_of_budget
        rows.append(("first token out of budget", "none" if budget is None else f"step {budget}"))
    flip = flip_text(c)
    rows.append(("first token flip", flip or "none"))
    if c.first_divergence:
        fd = c.first_divergence
        rows.append(("first divergence", f"step {fd['step']}, {fd['name']}: {fd['reason']}"))
    elif any(e.status == PASS for e in c.entries):
        rows.append(("first divergence", "none: every compared tensor is within tolerance"))
    else:
        rows.append(("first divergence", "none found: no tensor was compared"))
    confirmed = [k for k in c.culprits if k.confirmed]
    if confirmed:
        rows.append(("culprit", culprit_text(confirmed[0])))
    else:
        rows.append(("culprit", "none" + (f"; suspect: {culprit_text(c.culprits[0])}" if c.culprits else "")))
    return rows
