"""The results of a comparison: plain data, the contract behind every report (see docs/report.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

REPORT_SCHEMA_VERSION = 1

# Entry statuses. Only PASS counts as agreement; the missing ones make a verdict "incomplete".
PASS = "pass"
FAIL = "fail"
SHAPE_MISMATCH = "shape_mismatch"
MISSING_IN_GOLDEN = "missing_in_golden"
MISSING_IN_TARGET = "missing_in_target"
TOKENS_DIFFER = "tokens_differ"
NOT_COMPARABLE = "not_comparable"
STATUSES = (PASS, FAIL, SHAPE_MISMATCH, MISSING_IN_GOLDEN, MISSING_IN_TARGET, TOKENS_DIFFER, NOT_COMPARABLE)
FAILING = frozenset({FAIL, SHAPE_MISMATCH})
MISSING = frozenset({MISSING_IN_GOLDEN, MISSING_IN_TARGET})
#: statuses of entries whose values were compared, passing or not
MEASURED = FAILING | {PASS}

MATCH, DIVERGED, INCOMPLETE = "match", "diverged", "incomplete"

Number = float | int | None


def clean(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings a reader can turn back with float()."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    # An item that is a plain int, str, bool, None or finite float is kept without a call (``v - v == 0`` is false
    # for NaN and Inf only): a JSON report of a decode compare cleans ~600k of them, and the call each was 0.3 of
    # its 0.5 s.
    if isinstance(value, dict):
        return {k: v if type(v) in _KEPT or (type(v) is float and v - v == 0) else clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [v if type(v) in _KEPT or (type(v) is float and v - v == 0) else clean(v) for v in value]
    return value


_KEPT = frozenset({int, str, bool, type(None)})


@dataclass(slots=True)
class EntryResult:
    """The comparison of one aligned key. ``error`` is what localization works with: the relative L2
    error of the worst row (token position), or for statistics-only pairs the relative difference
    of norms; ``budget`` is the rel_l2 budget of the pair's lower-precision dtype."""

    index: int
    rank: int
    step: int
    module: str
    call: int
    part: str
    path: str
    name: str
    type: str
    status: str
    reason: str = ""
    golden_dtype: str | None = None
    target_dtype: str | None = None
    golden_shape: list[int] | None = None
    target_shape: list[int] | None = None
    kind: str = "tensor"  # tensor | stats | none
    logits: bool = False
    metrics: dict[str, Number] = field(default_factory=dict)
    error: float | None = None
    budget: float | None = None
    seq: tuple[int, int] = (0, 0)  # golden and target execution order, for localization
    #: in a cross-engine compare: each engine's own entries behind this canonical point
    golden_source: str | None = None
    target_source: str | None = None
    #: of a failing tensor reassembled from tensor-parallel shards: each rank's rel_l2, and the ranks to blame
    rank_errors: dict[int, float] | None = None
    ranks: list[int] | None = None

    @property
    def is_input(self) -> bool:
        return self.part in ("input", "kwarg")

    def to_json(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict: asdict deep-copies every value, which made writing the
        # JSON report of a 30k-entry decode compare take longer than the compare itself. Only the fields that
        # are mutable or may hold NaN/Inf go through clean (which copies them).
        record = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        for name in _CLEANED_FIELDS:
            value = record[name]
            if not (type(value) in _KEPT or (type(value) is float and value - value == 0)):  # as in clean
                record[name] = clean(value)
        return record


_ENTRY_FIELDS = tuple(f.name for f in fields(EntryResult) if f.name != "seq")
_CLEANED_FIELDS = ("golden_shape", "target_shape", "metrics", "error", "budget", "rank_errors", "ranks")


@dataclass
class TokenStep:
    """Logits of one step (the last position is the next-token distribution under ``generate``)."""

    rank: int
    step: int
    golden_token: int | None = None
    target_token: int | None = None
    inputs_match: bool | None = None
    cosine: float | None = None
    kl: float | None = None
    kl_max: float | None = None
    top1_agree: float | None = None
    golden_margin: float | None = None
    logit_error: float | None = None
    within_budget: bool | None = None
    flip: bool = False
    near_tie: bool | None = None


@dataclass
class Tokens:
    steps: list[TokenStep] = field(default_factory=list)
    logits_entry: str | None = None
    first_out_of_budget: int | None = None
    first_flip: dict[str, Any] | None = None
    first_input_mismatch: int | None = None
    budget: dict[str, float] = field(default_factory=dict)


@dataclass
class Culprit:
    """A module call ranked by the error it introduced (see :mod:`llmdiff.compare.localize`)."""

    rank: int
    step: int
    module: str
    call: int
    score: float
    input_error: float
    output_error: float
    introduced_error: float
    expected_error: float
    reason: str
    steps: int = 1
    confirmed: bool = True
    #: in a cross-engine compare: the module as each engine names it, and the requests it showed in
    golden_module: str | None = None
    target_module: str | None = None
    requests: list[int] | None = None
    #: in a tensor-parallel compare: the ranks whose shards (or whose copy) of its output carry the error
    ranks: list[int] | None = None


@dataclass
class Comparison:
    """Everything a comparison found. Reports render it; ``to_json`` is the stable contract."""

    verdict: str
    golden: str
    target: str
    first_divergence: dict[str, Any] | None
    culprits: list[Culprit]
    tokens: Tokens
    entries: list[EntryResult]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    #: in a cross-engine compare: one summary per request (verdict, first divergence, token flip, culprit)
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: for each tensor-parallel side: whether its ranks agree on the tensors they all hold (see ``--across-ranks``)
    ranks_agree: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for entry in self.entries:
            counts[entry.status] = counts.get(entry.status, 0) + 1
        counts["total"] = len(self.entries)
        return counts

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == MATCH else 1

    def summary_rows(self) -> list[dict[str, Any]]:
        """Steps, modules and tensors, each as matching / mismatched / missing counts."""
        def bucket(statuses: list[str]) -> str:
            if any(s in FAILING or s == TOKENS_DIFFER for s in statuses):
                return "mismatched"
            if any(s in MISSING or s == NOT_COMPARABLE for s in statuses):
                return "missing"
            return "matching"

        groups: dict[str, dict[Any, list[str]]] = {"steps": {}, "modules": {}, "tensors": {}}
        for e in self.entries:
            groups["steps"].setdefault((e.rank, e.step), []).append(e.status)
            groups["modules"].setdefault((e.rank, e.module), []).append(e.status)
            groups["tensors"].setdefault(e.index, []).append(e.status)
        rows = []
        for level, members in groups.items():
            row: dict[str, Any] = {"level": level, "total": len(members), "matching": 0, "mismatched": 0,
                                   "missing": 0}
            for statuses in members.values():
                row[bucket(statuses)] += 1
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        head = clean({
            "schema_version": REPORT_SCHEMA_VERSION,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "golden": self.golden,
            "target": self.target,
            "first_divergence": self.first_divergence,
            "culprits": [asdict(c) for c in self.culprits],
            "tokens": asdict(self.tokens),
            "summary": {"counts": self.counts, "levels": self.summary_rows()},
            "settings": self.settings,
            "notes": self.notes,
            "problems": self.problems,
            "metric_names": self.metric_names,
            "requests": self.requests,
            "ranks_agree": self.ranks_agree,
        })
        head["entries"] = [e.to_json() for e in self.entries]  # each already clean
        return head
