"""Per-tensor statistics, computed on the tensor's own device in few passes.

The common case (all values finite) costs three reductions: ``aminmax``, ``var_mean`` and one
``isfinite().all()``; the L2 norm is derived from mean and variance. Only a tensor that holds NaN or
Inf pays for counting them and for statistics over its finite values.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch


def _floats(t: torch.Tensor) -> torch.Tensor:
    # Reductions of bf16/fp16 values are done in fp32, of fp64 in fp64, of integers and bools in fp64.
    if t.dtype in (torch.float32, torch.float64):
        return t
    if t.is_floating_point():
        return t.float()
    return t.double()


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """min, max, mean, population std, L2 norm, NaN and Inf counts of ``t`` as plain Python numbers."""
    n = t.numel()
    if n == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "norm": 0.0, "nan": 0, "inf": 0}
    if t.is_complex():
        t = torch.view_as_real(t)
    x = _floats(t.detach()).reshape(-1)
    nan = inf = 0
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return {"min": None, "max": None, "mean": None, "std": None, "norm": None, "nan": nan, "inf": inf}
    lo, hi = torch.aminmax(x)
    var, mean = torch.var_mean(x, correction=0)
    packed = torch.stack([lo.double(), hi.double(), mean.double(), var.double()]).tolist()
    lo_v, hi_v, mean_v, var_v = packed
    var_v = max(var_v, 0.0)
    norm = math.sqrt(x.numel() * (var_v + mean_v * mean_v))
    return {"min": lo_v, "max": hi_v, "mean": mean_v, "std": math.sqrt(var_v), "norm": norm, "nan": nan, "inf": inf}


def batch_stats(tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
    """:func:`tensor_stats` of many small tensors of one device with a handful of reductions in all.

    A decode step yields hundreds of tensors of a few thousand elements each; reducing them one by
    one costs more in per-call overhead than in arithmetic. Here they are concatenated (in float64)
    and reduced per segment. Tensors that hold NaN/Inf, are empty or complex take the one-by-one path.
    """
    results: list[dict[str, Any] | None] = [None] * len(tensors)
    batch = [i for i, t in enumerate(tensors) if t.numel() and not t.is_complex()]
    if batch:
        # float64 before concatenating: cat would promote int64 ids and float32 values to a bf16 neighbour
        flat = torch.cat([tensors[i].detach().reshape(-1).to(torch.float64) for i in batch])
        lengths = torch.tensor([tensors[i].numel() for i in batch], device=flat.device)
        table = torch.stack([
            torch.segment_reduce(flat, "min", lengths=lengths),
            torch.segment_reduce(flat, "max", lengths=lengths),
            torch.segment_reduce(flat, "sum", lengths=lengths),
            torch.segment_reduce(flat * flat, "sum", lengths=lengths),
            torch.segment_reduce((~torch.isfinite(flat)).to(torch.float64), "sum", lengths=lengths),
        ], dim=1).tolist()
        for i, (lo, hi, total, squares, bad) in zip(batch, table, strict=True):
            if bad:
                continue
            n = tensors[i].numel()
            mean = total / n
            var = max(squares / n - mean * mean, 0.0)
            results[i] = {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(var), "norm": math.sqrt(squares),
                          "nan": 0, "inf": 0}
    return [r if r is not None else tensor_stats(t) for r, t in zip(results, tensors, strict=True)]


def content_hash(t: torch.Tensor) -> str:
    """A hash of the tensor's dtype, shape and bytes, for bit-exactness checks across runs."""
    cpu = t.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{cpu.dtype}|{tuple(cpu.shape)}|".encode())
    if cpu.numel():
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
