"""Metrics: small pure functions over one (golden, target) pair.

A metric takes a :class:`Pair` and returns one float. ``Pair`` holds the two tensors, upcast to a
common float type and flattened, and caches what several metrics share (the difference, the norms,
the element-wise relative errors), so computing all metrics costs a few passes, not one per metric.
``golden`` is always the reference: relative errors divide by it.

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
from functools import cached_property

import torch

REL_FLOOR = 1e-3


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when either side is float64 (or integer), else float32."""
    if any(d == torch.float64 or not (d.is_floating_point or d.is_complex) for d in dtypes):
        return torch.float64
    return torch.float32


class Pair:
    """Two tensors of one shape, flattened and upcast, with the intermediates metrics share."""

    def __init__(self, golden: torch.Tensor, target: torch.Tensor) -> None:
        dtype = compute_dtype(golden.dtype, target.dtype)
        g = golden.detach().reshape(-1).to(dtype)
        t = target.detach().reshape(-1).to(dtype)
        fg, ft = torch.isfinite(g), torch.isfinite(t)
        if bool(fg.all()) and bool(ft.all()):
            self.nonfinite_mismatch = 0
        else:
            both_nan = torch.isnan(g) & torch.isnan(t)
            same_inf = torch.isinf(g) & (g == t)
            self.nonfinite_mismatch = int((~(fg & ft) & ~both_nan & ~same_inf).sum())
            keep = fg & ft
            g, t = g[keep], t[keep]
        self.golden, self.target = g, t

    @cached_property
    def diff(self) -> torch.Tensor:
        return self.target - self.golden

    @cached_property
    def abs_diff(self) -> torch.Tensor:
        return self.diff.abs()

    @cached_property
    def golden_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.golden))

    @cached_property
    def target_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.target))

    @cached_property
    def diff_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.diff))

    @cached_property
    def rel_errors(self) -> torch.Tensor:
        """Element-wise ``|t - g| / max(|g|, 1e-3 * rms(g))``."""
        n = self.golden.numel()
        rms = self.golden_norm / math.sqrt(n) if n else 0.0
        floor = max(REL_FLOOR * rms, torch.finfo(self.golden.dtype).tiny)
        return self.abs_diff / self.golden.abs().clamp_min(floor)

    @property
    def empty(self) -> bool:
        return self.golden.numel() == 0


Metric = Callable[[Pair], float]


def cosine(p: Pair) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all zeros."""
    if p.golden_norm == 0.0 and p.target_norm == 0.0:
        return 1.0
    if p.golden_norm == 0.0 or p.target_norm == 0.0:
        return 0.0
    return min(1.0, float(torch.dot(p.golden, p.target)) / (p.golden_norm * p.target_norm))


def rel_l2(p: Pair) -> float:
    """``||t - g|| / ||g||``; 0 when equal, inf when the golden is all zeros and the target is not."""
    if p.diff_norm == 0.0:
        return 0.0
    return p.diff_norm / p.golden_norm if p.golden_norm else math.inf


def sqnr_db(p: Pair) -> float:
    """Signal-to-quantization-noise ratio, ``20 log10(||g|| / ||t - g||)``; inf when equal."""
    err = rel_l2(p)
    if err == 0.0:
        return math.inf
    return -20.0 * math.log10(err) if math.isfinite(err) else -math.inf


def max_abs(p: Pair) -> float:
    return 0.0 if p.empty else float(p.abs_diff.max())


def mean_abs(p: Pair) -> float:
    return 0.0 if p.empty else float(p.abs_diff.mean())


def max_rel(p: Pair) -> float:
    return 0.0 if p.empty else float(p.rel_errors.max())


def frac_rel_above(threshold: float) -> Metric:
    """A metric: the fraction of elements whose relative error exceeds ``threshold``."""

    def metric(p: Pair) -> float:
        return 0.0 if p.empty else float((p.rel_errors > threshold).sum()) / p.golden.numel()

    metric.__name__ = f"frac_rel_gt_{threshold:g}"
    return metric


def mismatches(p: Pair, rtol: float, atol: float) -> int:
    """Elements failing ``|t - g| <= atol + rtol * |g|`` (allclose with the golden as reference)."""
    return int((p.abs_diff > atol + rtol * p.golden.abs()).sum()) + p.nonfinite_mismatch


#: The element-wise metrics every tensor pair gets, by report name.
TENSOR_METRICS: dict[str, Metric] = {
    "cosine": cosine,
    "rel_l2": rel_l2,
    "sqnr_db": sqnr_db,
    "max_abs": max_abs,
    "mean_abs": mean_abs,
    "max_rel": max_rel,
    "frac_rel_gt_1e-3": frac_rel_above(1e-3),
    "frac_rel_gt_5e-3": frac_rel_above(5e-3),
}


# -- logits: a softmax over the vocabulary (the last dim) at each token position ---------------------
def positions(logits: torch.Tensor) -> torch.Tensor:
    """Logits as ``[positions, vocab]`` in float32 or float64."""
    x = logits.detach().to(compute_dtype(logits.dtype))
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


def kl_per_position(golden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(golden || target) between the softmax distributions at each token position."""
    log_p = torch.log_softmax(positions(golden).double(), -1)
    log_q = torch.log_softmax(positions(target).double(), -1)
    return (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1).clamp_min(0.0)


def top1_per_position(logits: torch.Tensor) -> torch.Tensor:
    return positions(logits).argmax(-1)


def top1_margin_per_position(logits: torch.Tensor) -> torch.Tensor:
    """The logit gap between the best and the second-best token at each position."""
    x = positions(logits)
    if x.shape[-1] < 2:
        return torch.full((x.shape[0],), math.inf, dtype=x.dtype)
    top2 = x.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def logits_metrics(golden: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per-position KL, top-1 agreement and the golden's top-1 margin, summarized over positions.

    ``kl`` is the mean over positions and ``kl_max`` the worst; ``top1_agree`` the fraction of
    positions with the same argmax; ``last_*`` describe the last position, the one ``generate``
    samples the next token from.
    """
    kl = kl_per_position(golden, target)
    g_top, t_top = top1_per_position(golden), top1_per_position(target)
    margin = top1_margin_per_position(golden)
    g_pos, t_pos = positions(golden), positions(target)
    last_err = float((t_pos[-1] - g_pos[-1]).abs().max())
    return {
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agree": float((g_top == t_top).double().mean()),
        "golden_margin": float(margin[-1]),
        "last_logit_err": last_err,
        "golden_token": int(g_top[-1]),
        "target_token": int(t_top[-1]),
    }


#: Metrics where a larger value is better (a threshold on them is a minimum).
HIGHER_IS_BETTER = frozenset({"cosine", "sqnr_db", "top1_agree"})
