"""Metrics: small pure functions over one (golden, target) pair.

A metric takes the :class:`PairStats` of a pair and returns one number. ``PairStats`` holds the
sufficient statistics of the pair (sums of squares, the dot product, extremes, counts), which
:mod:`llmdiff.compare.kernels` gathers from the tensors in streaming passes, so every metric costs
nothing extra. ``golden`` is always the reference: relative errors divide by it. This module needs
neither torch nor NumPy: a comparison of two statistics dumps never imports torch.

Relative errors near zero
-------------------------
Element-wise relative error ``|t - g| / |g|`` explodes where the golden value is ~0. Here the
denominator is ``max(|g|, floor)`` with ``floor = 1e-3 * rms(golden)``: an element a thousand times
smaller than the tensor's typical magnitude is judged on the typical magnitude instead.

Non-finite values
-----------------
Positions where both sides hold the same NaN or Inf are left out; positions where they disagree are
counted in ``nonfinite_mismatch``, which fails any comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

REL_FLOOR = 1e-3
REL_THRESHOLDS = (1e-3, 5e-3)


@dataclass
class PairStats:
    """Sufficient statistics of a (golden, target) pair over the positions finite on both sides."""

    n: int = 0
    gg: float = 0.0  # sum of golden squared
    tt: float = 0.0
    gt: float = 0.0  # dot product
    dd: float = 0.0  # sum of squared differences
    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_rel: float = 0.0
    rel_above: dict[float, int] = field(default_factory=dict)
    mismatches: int = 0
    nonfinite_mismatch: int = 0
    worst_row_rel_l2: float = 0.0


Metric = Callable[[PairStats], float]


def cosine(s: PairStats) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all zeros."""
    if s.gg == 0.0 and s.tt == 0.0:
        return 1.0
    if s.gg == 0.0 or s.tt == 0.0:
        return 0.0
    return max(-1.0, min(1.0, s.gt / math.sqrt(s.gg * s.tt)))


def rel_l2(s: PairStats) -> float:
    """``||t - g|| / ||g||``; 0 when equal, inf when the golden is all zeros and the target is not."""
    if s.dd == 0.0:
        return 0.0
    return math.sqrt(s.dd / s.gg) if s.gg else math.inf


def sqnr_db(s: PairStats) -> float:
    """Signal-to-quantization-noise ratio, ``20 log10(||g|| / ||t - g||)``; inf when equal."""
    err = rel_l2(s)
    if err == 0.0:
        return math.inf
    return -20.0 * math.log10(err) if math.isfinite(err) else -math.inf


def max_abs(s: PairStats) -> float:
    return s.max_abs


def mean_abs(s: PairStats) -> float:
    return s.sum_abs / s.n if s.n else 0.0


def max_rel(s: PairStats) -> float:
    """The largest element-wise relative error (see the module docstring for the floor)."""
    return s.max_rel


def frac_rel_above(threshold: float) -> Metric:
    """A metric: the fraction of elements whose relative error exceeds ``threshold`` (1e-3 or 5e-3)."""

    def metric(s: PairStats) -> float:
        return s.rel_above[threshold] / s.n if s.n else 0.0

    metric.__name__ = f"frac_rel_gt_{threshold:g}"
    return metric


def worst_row_rel_l2(s: PairStats) -> float:
    """The relative L2 error of the worst row (token position); rel_l2 for 1-D tensors."""
    return s.worst_row_rel_l2


def mismatches(s: PairStats) -> int:
    """Elements failing the allclose test given to :func:`pair_stats`, NaN/Inf disagreements included."""
    return s.mismatches


#: The element-wise metrics every tensor pair gets, by report name.
TENSOR_METRICS: dict[str, Metric] = {
    "cosine": cosine,
    "rel_l2": rel_l2,
    "sqnr_db": sqnr_db,
    "max_abs": max_abs,
    "mean_abs": mean_abs,
    "max_rel": max_rel,
    "worst_row_rel_l2": worst_row_rel_l2,
    "frac_rel_gt_1e-3": frac_rel_above(1e-3),
    "frac_rel_gt_5e-3": frac_rel_above(5e-3),
}

#: Metrics where a larger value is better (a threshold on them is a minimum).
HIGHER_IS_BETTER = frozenset({"cosine", "sqnr_db", "top1_agree"})
