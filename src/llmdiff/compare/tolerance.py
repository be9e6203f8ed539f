"""Dtype-aware tolerances: how much disagreement two healthy runs are expected to show.

The defaults come from the *lower-precision* dtype of the two sides, through its unit roundoff
``u`` (half the gap between 1.0 and the next representable number):

============  ==========  =====================  ============================
dtype         u           rel_l2 budget (entry)  KL budget (logits, per position)
============  ==========  =====================  ============================
float64       1.1e-16     1e-10                  1e-12
float32       6.0e-8      1e-4                   1e-5
float16       4.9e-4      5e-2                   2e-3
bfloat16      3.9e-3      4e-1                   2e-2
============  ==========  =====================  ============================

Why these numbers: one rounding to a dtype gives a relative L2 error of about ``u / sqrt(3)``; a
decoder stack adds such errors op after op and carries the earlier ones along. Measured on a
healthy bf16-vs-fp32 run of SmolLM2-135M (32 generated tokens): hidden states end at ~0.03, most
tensors stay under 0.06, but a gated-MLP product on a token where it nearly cancels reached 0.16,
and the logits' KL reached 6e-3 (above msIT's 5e-3 guideline, which is therefore not the
default; pass ``--threshold cosine=0.999 --threshold kl=0.005`` for it). vLLM's CPU kernels in bf16
against transformers in fp32 (prefill and 16 decode steps of two prompts) reach 0.255 on one decode
row of a mid-stack attention output, the residual stream around it 0.20, with the same tokens
generated. The bf16 budgets sit ~1.5-3x above those maxima; float16 scales them by its 8x smaller
``u``; float32 budgets leave room for different reduction orders across kernels, far below what a
real bug changes. Logits are judged by KL only: softmax ignores a constant shift, so rel_l2 and
cosine of raw logits overstate harmless differences; the KL budget applies to the mean over
positions, and no single position may exceed it ``KL_WORST_POSITION`` times. A NaN or Inf on one
side only always fails.

Budgets catch gross errors. Subtle faults that stay inside them are found by localization, which
measures the error each module *adds* against ``u`` and against its peers, and confirms a fault
that shows at every step (see :mod:`llmdiff.compare.localize`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmdiff.compare.metrics import HIGHER_IS_BETTER
from llmdiff.errors import UsageError

#: Logits pass when their KL, averaged over positions, is within budget and no position exceeds this
#: many budgets (a 512-token prefill of a healthy bf16 run reached 1.5x the budget at its worst position).
KL_WORST_POSITION = 5

UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float8_e4m3fn": 2.0**-4,
    "float8_e5m2": 2.0**-3,
}
REL_L2_BUDGET = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-2, "bfloat16": 4e-1,
                 "float8_e4m3fn": 0.5, "float8_e5m2": 1.0}
KL_BUDGET = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2,
             "float8_e4m3fn": 0.1, "float8_e5m2": 0.2}

#: Named logits rules (``--preset``). ``msit``: msIT's guideline for logits, cosine > 0.999 and KL under
#: 0.005 (bfloat16) or 0.0001 (float16); dtypes it does not name keep llmdiff's budget.
PRESETS: dict[str, dict[str, Any]] = {
    "msit": {"cosine": 0.999, "kl": {"bfloat16": 5e-3, "float16": 1e-4}},
}


@functools.lru_cache(maxsize=256)  # called for every pair, with a handful of distinct dtypes
def lower_precision(*dtypes: str) -> str:
    """The dtype with the largest unit roundoff; integer and unknown dtypes count as exact."""
    floats = [d for d in dtypes if d in UNIT_ROUNDOFF]
    return max(floats, key=lambda d: UNIT_ROUNDOFF[d]) if floats else "float64"


def unit_roundoff(*dtypes: str) -> float:
    return UNIT_ROUNDOFF[lower_precision(*dtypes)]


@dataclass(frozen=True)
class Tolerance:
    """How a pair is judged. ``rtol``/``atol`` switch to an element-wise allclose test (like vLLM's
    compare); ``thresholds`` ({metric: limit}) replace the default rel_l2 budget."""

    rtol: float | None = None
    atol: float | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise UsageError(f"--preset: {self.preset!r} is not one of {', '.join(PRESETS)}")

    def kl_budget(self, dtype: str) -> float:
        """The mean-KL limit for logits at ``dtype``: the preset's, else llmdiff's budget."""
        preset = PRESETS.get(self.preset or "", {})
        return float(preset.get("kl", {}).get(dtype, KL_BUDGET[dtype]))

    @property
    def logits_min_cosine(self) -> float | None:
        return PRESETS.get(self.preset or "", {}).get("cosine")

    @property
    def allclose(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def allclose_tolerances(self, dtype: str) -> tuple[float, float]:
        """(rtol, atol) for mismatch counting: the user's, or ones scaled to the dtype."""
        budget = REL_L2_BUDGET[lower_precision(dtype)]
        rtol = self.rtol if self.rtol is not None else budget
        atol = self.atol if self.atol is not None else budget * 1e-2
        return rtol, atol

    def judge(self, metrics: Mapping[str, float | int | None], dtype: str) -> tuple[bool, str]:
        """Whether ``metrics`` of one pair at ``dtype`` (the lower precision) pass, and why not."""
        if metrics.get("nonfinite_mismatch"):
            return False, f"{metrics['nonfinite_mismatch']} positions NaN/Inf on one side only"
        if self.allclose and metrics.get("mismatches"):
            rtol, atol = self.allclose_tolerances(dtype)
            return False, f"{metrics['mismatches']} elements outside rtol={rtol:g} atol={atol:g}"
        if self.thresholds:
            return self._judge_thresholds(metrics)
        if self.allclose and "mismatches" in metrics:
            return True, ""
        error = metrics.get("rel_l2", metrics.get("norm_rel"))
        budget = REL_L2_BUDGET[dtype]
        if error is not None and not error <= budget:
            name = "rel_l2" if "rel_l2" in metrics else "norm_rel"
            return False, f"{name} {error:.3g} > {budget:g} ({dtype} budget)"
        return True, ""

    def _judge_thresholds(self, metrics: Mapping[str, float | int | None]) -> tuple[bool, str]:
        for name, limit in self.thresholds.items():
            value = metrics.get(name)
            if value is None:
                continue
            ok = value >= limit if name in HIGHER_IS_BETTER else value <= limit
            if not ok:
                return False, f"{name} {value:.4g} {'<' if name in HIGHER_IS_BETTER else '>'} {limit:g}"
        return True, ""


def parse_thresholds(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Parse ``["cosine=0.999", "kl=0.005"]``."""
    thresholds = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            thresholds[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--threshold: expected NAME=VALUE like cosine=0.999, got {item!r}") from None
    return thresholds

