"""The arithmetic of a comparison over tensors: the :class:`~llmdiff.compare.metrics.PairStats` of a pair
(a fused torch path, the NumPy reference path it is held equal to, many small pairs at once) and the
per-position metrics of logits.

The statistics are gathered in two streaming passes over fixed-size chunks (the relative-error floor needs
the golden's rms first), so that comparing a 100 MB tensor needs a few MB of scratch memory. Element-wise
work runs in float32 unless either side is float64 or an integer; every sum accumulates in float64.
This is the compare's only module that imports torch for its arithmetic, and it is imported on the first
pair of tensors: comparing statistics needs none of it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from llmdiff.compare.metrics import REL_FLOOR, REL_THRESHOLDS, PairStats, rel_l2

CHUNK = 1 << 20


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when either side is float64 (or integer), else float32."""
    if any(d == torch.float64 or not (d.is_floating_point or d.is_complex) for d in dtypes):
        return torch.float64
    return torch.float32


def _chunks(golden: torch.Tensor, target: torch.Tensor, size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """Aligned float chunks of both sides, each ``size`` elements (the last may be shorter).

    Positions not finite on both sides are set to 0 on both sides, which removes them from every
    sum, maximum and count; each chunk comes with its count of kept positions and of disagreements.
    """
    dtype = compute_dtype(golden.dtype, target.dtype)
    g_all, t_all = golden.detach().reshape(-1), target.detach().reshape(-1)
    for start in range(0, g_all.numel(), size):
        g = g_all[start:start + size].to(dtype).cpu().numpy()
        t = t_all[start:start + size].to(dtype).cpu().numpy()
        fg, ft = np.isfinite(g), np.isfinite(t)
        if fg.all() and ft.all():
            yield g, t, g.size, 0
            continue
        both_nan = np.isnan(g) & np.isnan(t)
        same_inf = np.isinf(g) & (g == t)
        keep = fg & ft
        g, t = np.where(keep, g, 0), np.where(keep, t, 0)
        yield g, t, int(np.count_nonzero(keep)), int(np.count_nonzero(~keep & ~both_nan & ~same_inf))


#: Beyond this magnitude a chunk is measured in float64: its squares would overflow float32.
HUGE = 1e18


def _measured(g: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(g, t, |g|, |t - g|), in float64 when squares of these values would overflow (e.g. attention
    masks filled with float32's most negative value)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here sends the chunk to float64
        abs_g, abs_d = np.abs(g), np.abs(t - g)
    if g.dtype != np.float64 and g.size and max(float(abs_g.max()), float(abs_d.max())) > HUGE:
        g, t = g.astype(np.float64), t.astype(np.float64)
        abs_g, abs_d = np.abs(g), np.abs(t - g)
    return g, t, abs_g, abs_d


def pair_stats(golden: torch.Tensor, target: torch.Tensor, rtol: float = 0.0, atol: float = 0.0) -> PairStats:
    """Gather :class:`PairStats` of a pair: the fused torch path (:func:`fused_pair_stats`) when both
    sides are finite real floats, else the reference path (:func:`reference_pair_stats`)."""
    fast = fused_pair_stats(golden, target, rtol, atol)
    return fast if fast is not None else reference_pair_stats(golden, target, rtol, atol)


#: Elements per chunk of the fused path: its five scratch buffers stay in the last-level cache between passes
#: (32 MB here). A tensor of one chunk is read once, its second pass working on what the first left in them: with
#: 1M elements a 512-token prefill's activations (512 x 576, 512 x 1536) are one chunk each (200 such pairs
#: of SmolLM2: 0.48 s in chunks of 256k elements, 0.38 s).
FUSED_CHUNK = 1 << 20
_scratch = threading.local()  # the compare runs pairs in a thread pool: one set of buffers per thread


def _buffers(count: int, size: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    key = (dtype, device)
    held: dict[Any, list[torch.Tensor]] = getattr(_scratch, "buffers", None) or {}
    _scratch.buffers = held
    bufs = held.get(key)
    if bufs is None or bufs[0].numel() < size:
        with torch.inference_mode(False):  # usable in and out of inference mode
            bufs = held[key] = [torch.empty(max(size, FUSED_CHUNK), dtype=dtype, device=device)
                                for _ in range(count)]
    return bufs


def _in(x: torch.Tensor, dtype: torch.dtype, buf: torch.Tensor) -> torch.Tensor:
    if x.dtype == dtype:
        return x
    out = buf[:x.numel()]
    out.copy_(x)
    return out


def fused_pair_stats(golden: torch.Tensor, target: torch.Tensor, rtol: float = 0.0,
                     atol: float = 0.0) -> PairStats | None:
    """:class:`PairStats` from fast vectorised torch reductions (BLAS dot products for the sums of
    squares) over cache-sized chunks, with two read-backs in all; the same numbers as
    :func:`reference_pair_stats` up to float rounding. None when a side holds NaN/Inf or values whose
    squares overflow, or is complex or empty: those pairs take the reference path."""
    if golden.is_complex() or target.is_complex() or golden.numel() == 0 or golden.numel() != target.numel():
        return None
    dtype = compute_dtype(golden.dtype, target.dtype)
    g_all, t_all = golden.detach().reshape(-1), target.detach().reshape(-1)
    n, row = g_all.numel(), _row_length(golden)
    size = min(n, max(1, FUSED_CHUNK // row) * row if row else FUSED_CHUNK)
    g_buf, t_buf, d_buf, a_buf, x_buf = _buffers(5, size, dtype, g_all.device)
    single = n <= size
    sums: list[torch.Tensor] = []  # gg, tt, gt, dd, sum |d|, max |d|, mismatches of each chunk
    row_g: list[torch.Tensor] = []
    row_d: list[torch.Tensor] = []

    def chunk(start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = _in(g_all[start:start + size], dtype, g_buf)
        t = _in(t_all[start:start + size], dtype, t_buf)
        return g, t, torch.sub(t, g, out=d_buf[:g.numel()])

    for start in range(0, n, size):
        g, t, d = chunk(start)
        if row:
            row_g.append(torch.linalg.vector_norm(g.view(-1, row), dim=1))
            row_d.append(torch.linalg.vector_norm(d.view(-1, row), dim=1))
        parts = [torch.dot(g, g), torch.dot(t, t), torch.dot(g, t), torch.dot(d, d)]
        abs_d = d.abs_()
        abs_g = torch.abs(g, out=a_buf[:g.numel()])
        allowed = torch.mul(abs_g, rtol, out=x_buf[:g.numel()]).add_(atol)
        # comparisons written as 0/1 into a float buffer and summed: several times faster than bool tensors
        parts += [abs_d.sum(), abs_d.max(), torch.gt(abs_d, allowed, out=allowed).sum()]
        sums.append(torch.stack(parts))
    table = torch.stack(sums).double()
    gg, tt, gt, dd, sum_abs = table[:, :5].sum(0).tolist()
    max_abs, mismatched = float(table[:, 5].max()), int(table[:, 6].sum())
    if not all(math.isfinite(v) for v in (gg, tt, gt, dd, sum_abs, max_abs)) or max_abs > HUGE:
        return None
    s = PairStats(n=n, gg=gg, tt=tt, gt=gt, dd=dd, max_abs=max_abs, sum_abs=sum_abs, mismatches=mismatched)
    floor = max(REL_FLOOR * math.sqrt(gg / n), float(torch.finfo(dtype).tiny))
    second: list[torch.Tensor] = []
    for start in range(0, n, size):
        if single:
            abs_g, abs_d = a_buf[:n], d_buf[:n]  # still there from the first pass
        else:
            g, _, d = chunk(start)
            abs_d, abs_g = d.abs_(), torch.abs(g, out=a_buf[:g.numel()])
        rel = abs_d.div_(abs_g.clamp_(min=floor))
        flags = x_buf[:rel.numel()]
        second.append(torch.stack([rel.max()] + [torch.gt(rel, thr, out=flags).sum() for thr in REL_THRESHOLDS]))
    if row_g:
        gg_rows, dd_rows = torch.cat(row_g).double().square(), torch.cat(row_d).double().square()
        row_floor = REL_FLOOR**2 * gg_rows.mean()
        rows = torch.where(row_floor > 0, (dd_rows / torch.maximum(gg_rows, row_floor)).sqrt(), dd_rows.sqrt())
        worst = rows.max().reshape(1)
    else:
        worst = torch.full((1,), -1.0, dtype=torch.float64, device=g_all.device)
    rel_table = torch.stack(second).double()
    values = torch.cat([rel_table[:, 0].max().reshape(1), rel_table[:, 1:].sum(0), worst]).tolist()
    s.max_rel = values[0]
    s.rel_above = {thr: int(v) for thr, v in zip(REL_THRESHOLDS, values[1:-1], strict=True)}
    s.worst_row_rel_l2 = values[-1] if values[-1] >= 0 else rel_l2(s)
    return s


def reference_pair_stats(golden: torch.Tensor, target: torch.Tensor, rtol: float = 0.0,
                         atol: float = 0.0) -> PairStats:
    """Gather :class:`PairStats` in two NumPy passes (the relative-error floor needs the golden's rms
    first); ``mismatches`` counts elements failing ``|t - g| <= atol + rtol * |g|``. Handles every
    case (NaN/Inf on either side, overflowing squares); the fused path is held equal to it by tests.

    Tensors of two or more dimensions are also measured row by row (a row is one vector of the last
    dimension: one token position of a hidden state): ``worst_row_rel_l2`` is the largest relative
    error of any row whose golden norm is at least 1e-3 of the rows' rms norm.
    """
    s = PairStats(rel_above=dict.fromkeys(REL_THRESHOLDS, 0))
    row = _row_length(golden)
    size = max(1, CHUNK // row) * row if row else CHUNK
    single = golden.numel() <= size  # one chunk: converted once and kept for the second pass
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    row_gg: list[np.ndarray] = []
    row_dd: list[np.ndarray] = []
    f64 = np.float64
    for g, t, n, bad in _chunks(golden, target, size):
        # Element-wise work in the compute dtype; every sum accumulates in float64.
        g, t, abs_g, abs_d = _measured(g, t)
        gg, dd = g * g, abs_d * abs_d
        s.n += n
        s.nonfinite_mismatch += bad
        s.gg += float(np.add.reduce(gg, dtype=f64))
        s.tt += float(np.add.reduce(t * t, dtype=f64))
        s.gt += float(np.add.reduce(g * t, dtype=f64))
        s.dd += float(np.add.reduce(dd, dtype=f64))
        if row:
            row_gg.append(np.add.reduce(gg.reshape(-1, row), axis=1, dtype=f64))
            row_dd.append(np.add.reduce(dd.reshape(-1, row), axis=1, dtype=f64))
        if g.size:
            s.max_abs = max(s.max_abs, float(abs_d.max()))
            s.sum_abs += float(np.add.reduce(abs_d, dtype=f64))
        s.mismatches += int(np.count_nonzero(abs_d > atol + rtol * abs_g)) + bad
        if single:
            kept.append((abs_g, abs_d, g))
    if row_gg:
        gg_rows, dd_rows = np.concatenate(row_gg), np.concatenate(row_dd)
        floor = REL_FLOOR**2 * float(gg_rows.mean())
        rows = np.sqrt(dd_rows / np.maximum(gg_rows, floor)) if floor > 0 else np.sqrt(dd_rows)
        s.worst_row_rel_l2 = float(rows.max()) if rows.size else 0.0
    else:
        s.worst_row_rel_l2 = rel_l2(s)
    floor = max(REL_FLOOR * math.sqrt(s.gg / s.n), 1e-300) if s.n else 1.0
    second = kept or ((*_measured(g, t)[2:], g) for g, t, _, _ in _chunks(golden, target, size))
    for abs_g, abs_d, g in second:
        if not g.size:
            continue
        rel = abs_d / np.maximum(abs_g, max(floor, float(np.finfo(abs_g.dtype).tiny)))  # all-zero goldens: 0/tiny
        s.max_rel = max(s.max_rel, float(rel.max()))
        for threshold in REL_THRESHOLDS:
            s.rel_above[threshold] += int(np.count_nonzero(rel > threshold))
    return s


# -- logits: a softmax over the vocabulary (the last dim) at each token position ---------------------
#: Logits per block of positions: 4 MB of float64 a side, which stays in the caches through a block's dozen
#: passes (blocks of 64 positions of SmolLM2's 49k vocabulary, 25 MB a side, took 0.50-0.57 s for a 512-token
#: prefill, blocks of 10 positions 0.29 s; the values are the same, each position being computed alone).
LOGIT_BLOCK = 1 << 19


def _block_rows(logits: torch.Tensor) -> int:
    """Positions per block of ``[positions, vocab]`` logits (see :data:`LOGIT_BLOCK`)."""
    return max(1, LOGIT_BLOCK // max(1, logits.shape[-1]))


def positions(logits: torch.Tensor) -> torch.Tensor:
    """Logits as ``[positions, vocab]`` (a view where possible)."""
    return logits.detach().reshape(-1, logits.shape[-1]) if logits.dim() else logits.detach().reshape(1, 1)


def kl_per_position(golden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(golden || target) between the softmax distributions at each token position, in float64,
    a block of positions at a time (a 512-token prefill over a 50k vocabulary is 200 MB per copy)."""
    g, t = positions(golden), positions(target)
    out = []
    rows = _block_rows(g)
    for start in range(0, g.shape[0], rows):
        log_p = torch.log_softmax(g[start:start + rows].double(), -1)
        log_q = torch.log_softmax(t[start:start + rows].double(), -1)
        out.append((log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1).clamp_min(0.0))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def top1_per_position(logits: torch.Tensor) -> torch.Tensor:
    return positions(logits).argmax(-1)


def top1_margin_per_position(logits: torch.Tensor) -> torch.Tensor:
    """The logit gap between the best and the second-best token at each position."""
    x = positions(logits)
    if x.shape[-1] < 2:
        return torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    top2 = x.topk(2, dim=-1).values.double()
    return top2[:, 0] - top2[:, 1]


def logprob_diff_per_position(golden: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``|log p_golden(t) - log p_target(t)|`` at each position for the token ``t`` given there (the
    target's greedy choice: what an engine sampled at temperature 0, the quantity an RL trainer
    recomputes); NaN where a side is not finite."""
    g_all, t_all, index = positions(golden), positions(target), tokens.reshape(-1, 1).to(torch.long)
    out = []
    block = _block_rows(g_all)
    for start in range(0, g_all.shape[0], block):  # a block of positions at a time, as kl_per_position
        rows = slice(start, start + block)
        g = torch.log_softmax(g_all[rows].double(), dim=-1).gather(1, index[rows])
        t = torch.log_softmax(t_all[rows].double(), dim=-1).gather(1, index[rows])
        out.append((g - t).abs().reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _per_position(golden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """KL, both top-1 tokens and |Δ log p| of the target's token at each position, in one blocked pass
    (one float64 log-softmax per side and block: what :func:`kl_per_position` and
    :func:`logprob_diff_per_position` compute separately)."""
    g_all, t_all = positions(golden), positions(target)
    kl, g_top, t_top, diff = [], [], [], []
    rows = _block_rows(g_all)
    # Two float64 blocks for the whole pair: fresh ones each block cost their page faults every time (glibc maps
    # and unmaps allocations this large), 0.25 of 0.65 s for a 512-token prefill's logits.
    scratch = torch.empty((2, min(rows, g_all.shape[0]), g_all.shape[-1]), dtype=torch.float64, device=g_all.device)
    for start in range(0, g_all.shape[0], rows):
        g, t = g_all[start:start + rows], t_all[start:start + rows]
        tokens_g, tokens_t = g.argmax(-1), t.argmax(-1)
        p_block, q_block = scratch[0, :g.shape[0]], scratch[1, :g.shape[0]]
        log_p = torch.log_softmax(p_block.copy_(g), -1, out=p_block)
        log_q = torch.log_softmax(q_block.copy_(t), -1, out=q_block)
        index = tokens_t.reshape(-1, 1)
        diff.append((log_p.gather(1, index) - log_q.gather(1, index)).abs().reshape(-1))
        log_q.neg_().add_(log_p)  # log p - log q, in place
        kl.append(log_q.mul_(log_p.exp_()).nan_to_num_(0.0).sum(-1).clamp_min(0.0))
        g_top.append(tokens_g)
        t_top.append(tokens_t)
    if not kl:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.long(), empty.long(), empty
    return torch.cat(kl), torch.cat(g_top), torch.cat(t_top), torch.cat(diff)


def logits_metrics(golden: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per-position KL, top-1 agreement and the golden's top-1 margin, summarized over positions.

    ``kl`` is the mean over positions and ``kl_max`` the worst; ``top1_agree`` the fraction of
    positions with the same argmax; ``golden_margin``, ``last_logit_err`` and the tokens describe the
    last position, the one ``generate`` takes the next token from.
    """
    kl, g_top, t_top, logprob_diff = _per_position(golden, target)
    g_last, t_last = positions(golden)[-1:], positions(target)[-1:]
    margin = top1_margin_per_position(g_last)
    values = torch.stack([kl.mean(), kl.max(), logprob_diff.max(), logprob_diff.mean(),
                          (g_top == t_top).double().mean(), margin[-1].double(),
                          (t_last.double() - g_last.double()).abs().max(),
                          g_top[-1].double(), t_top[-1].double()]).tolist()  # one read-back
    names = ("kl", "kl_max", "logprob_diff_max", "logprob_diff_mean", "top1_agree", "golden_margin",
             "last_logit_err")
    out: dict[str, float] = dict(zip(names, values[:7], strict=True))
    out["golden_token"], out["target_token"] = int(values[7]), int(values[8])
    return out


# -- many small pairs at once ----------------------------------------------------------------------
#: Pairs up to this many elements are measured together by :func:`pair_stats_batch`.
BATCH_MAX = 1 << 14


def pair_stats_batch(pairs: list[tuple[torch.Tensor, torch.Tensor, float, float]]) -> list[PairStats]:
    """:func:`pair_stats` of many small (golden, target, rtol, atol) pairs, a few vectorized passes for all.

    The decode steps of an LLM hold tens of thousands of tensors of a handful of shapes; measuring them
    one by one is dominated by per-call overhead. Pairs of one shape and dtypes are stacked into
    matrices and reduced row-wise. Pairs holding NaN/Inf or huge values, empty ones and float64 ones are
    measured by :func:`reference_pair_stats`, and every result equals it (up to the order of float64
    summation).
    """
    out: list[PairStats | None] = [None] * len(pairs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (g, t, _, _) in enumerate(pairs):
        if (g.numel() > 0 and g.dtype != torch.float64 and t.dtype != torch.float64 and g.is_floating_point()
                and t.is_floating_point() and g.shape == t.shape):
            groups.setdefault((g.shape, g.dtype, t.dtype), []).append(i)
    for indices in groups.values():
        for i, s in zip(indices, _group_stats([pairs[i] for i in indices]), strict=True):
            out[i] = s
    return [s if s is not None else reference_pair_stats(*pairs[i]) for i, s in enumerate(out)]


#: Elements of a group measured at once, so that its float32 temporaries stay cache-sized (a decode step's
#: groups hold thousands of pairs; on the decode pair of bench/run.py: 0.45-0.51 s for the groups, 0.56 s whole).
GROUP_BLOCK = 1 << 16


def _group_stats(group: list[tuple[torch.Tensor, torch.Tensor, float, float]]) -> list[PairStats | None]:
    """Statistics of pairs of one shape, rows of a [pairs, elements] matrix: element-wise work in float32
    and sums in float64, as the reference path. None for a pair the reference path must measure."""
    rows = max(1, GROUP_BLOCK // max(1, group[0][0].numel()))
    if len(group) > rows:
        return [s for start in range(0, len(group), rows) for s in _block_stats(group[start:start + rows])]
    return _block_stats(group)


def _block_stats(group: list[tuple[torch.Tensor, torch.Tensor, float, float]]) -> list[PairStats | None]:
    k, f64 = len(group), torch.float64
    g = torch.stack([p[0].detach() for p in group]).reshape(k, -1).float()
    t = torch.stack([p[1].detach() for p in group]).reshape(k, -1).float()
    n = g.shape[1]
    abs_g, abs_d = g.abs(), (t - g).abs_()
    gg_e, dd_e = g * g, abs_d * abs_d
    gg = gg_e.sum(1, dtype=f64)
    rtol = torch.tensor([[p[2]] for p in group], dtype=torch.float32)
    atol = torch.tensor([[p[3]] for p in group], dtype=torch.float32)
    floor = torch.clamp(REL_FLOOR * torch.sqrt(gg / n), min=float(torch.finfo(torch.float32).tiny))
    rel = abs_d / torch.maximum(abs_g, floor.float().unsqueeze(1))
    columns = [gg, (t * t).sum(1, dtype=f64), (g * t).sum(1, dtype=f64), dd_e.sum(1, dtype=f64),
               abs_d.sum(1, dtype=f64), abs_d.amax(1).double(), (abs_d > atol + rtol * abs_g).sum(1).double(),
               rel.amax(1).double(), *((rel > thr).sum(1).double() for thr in REL_THRESHOLDS),
               # NaN/Inf or |values| whose squares overflow float32: left to the reference path
               (~(abs_g.amax(1) <= HUGE) | ~(abs_d.amax(1) <= HUGE)).double()]
    row = _row_length(group[0][0])
    if row:
        row_gg = gg_e.reshape(k, -1, row).sum(-1, dtype=f64)
        row_dd = dd_e.reshape(k, -1, row).sum(-1, dtype=f64)
        row_floor = (REL_FLOOR**2 * row_gg.mean(1)).unsqueeze(1)
        rows = torch.where(row_floor > 0, torch.sqrt(row_dd / torch.maximum(row_gg, row_floor)), torch.sqrt(row_dd))
        columns.append(rows.amax(1))
    table = torch.stack(columns, dim=1).tolist()  # one read-back for the whole group
    stats: list[PairStats | None] = []
    for values in table:
        gg_v, tt_v, gt_v, dd_v, sum_abs, max_abs, mismatched, max_rel, *above = values[:8 + len(REL_THRESHOLDS)]
        if values[8 + len(REL_THRESHOLDS)]:
            stats.append(None)
            continue
        s = PairStats(n=n, gg=gg_v, tt=tt_v, gt=gt_v, dd=dd_v, max_abs=max_abs, sum_abs=sum_abs, max_rel=max_rel,
                      rel_above={thr: int(c) for thr, c in zip(REL_THRESHOLDS, above, strict=True)},
                      mismatches=int(mismatched))
        s.worst_row_rel_l2 = values[-1] if row else rel_l2(s)
        stats.append(s)
    return stats


def _row_length(golden: torch.Tensor) -> int:
    """The length of a row (the last dimension) when ``golden`` has two or more dimensions and several
    rows; 0 when it has no row structure."""
    row = golden.shape[-1] if golden.dim() >= 2 else 0
    return int(row) if row and golden.numel() > row else 0
