"""Per-tensor statistics: reduced on the tensor's own device, read back to the host once per batch.

A capture records hundreds of tensors per step. Reducing each one and reading its numbers back at
once would cost one device synchronisation per tensor (and, on CPU, torch's slow ``var_mean`` and
``isfinite`` passes were most of the capture's overhead). Instead each tensor becomes a *row* of
device scalars, ``min, max, sum, m2`` (``m2``: the sum of squared deviations from the mean), made
of the fast vectorised reductions ``aminmax``, ``sum`` and ``dot``:

* :func:`reduce_rows` turns a list of tensors into one ``[k, 4]`` table on their device: tensors of
  one dtype and shape up to ``GROUP_MAX`` elements stacked into reusable matrices and reduced row-wise
  (a few reductions for a whole decode step's tensors), larger ones chunk by chunk through a reusable
  scratch buffer (no allocation per tensor);
* :func:`read_back` moves a table to the host: the only device-to-host transfer of statistics;
* :func:`batch_stats` finishes the table on the device (mean, std, norm, and whether a row is finite)
  and turns its rows into the statistics written to the manifest; only for a row that shows NaN or Inf
  is :func:`tensor_stats` (exact counts, statistics over the finite values) run on that tensor.

The CPU path and the accelerator path are the same code.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from llmdiff.store.schema import UNKNOWN_STATS

#: Tensors up to GROUP_MAX elements are reduced together, as the rows of a matrix per dtype and shape (in blocks of
#: at most BLOCK elements): for them a reduction's fixed cost is most of its cost. Larger ones are reduced one by one,
#: in chunks of CHUNK elements through a scratch buffer: stacking them would cost more memory passes than it saves
#: (measured on msProbe's prefill shape, 65,536-element tensors: 1.11x grouped one by one, 1.23-1.41x stacked).
GROUP_MAX = 1 << 14
CHUNK = 1 << 18
BLOCK = 1 << 22

_local = threading.local()  # scratch memory per thread: two captures may flush at once in two threads


def _scratch_for(device: torch.device, dtype: torch.dtype, use: str = "chunk", size: int = CHUNK) -> torch.Tensor:
    """Reusable memory of at least ``size`` elements for one use; it grows, never shrinks (a step's largest group)."""
    held: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] | None = getattr(_local, "scratch", None)
    if held is None:
        held = _local.scratch = {}
    buf = held.get((device, dtype, use))
    if buf is None or buf.numel() < size:
        with torch.inference_mode(False):  # usable in and out of inference mode (vLLM runs in it)
            buf = held[(device, dtype, use)] = torch.empty(max(size, CHUNK), device=device, dtype=dtype)
    return buf


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 are reduced in fp32, fp64 in fp64, integers and bools in fp64 (exact below 2**53).
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype.is_floating_point else torch.float64


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).reshape(-1)


def _reduce_large(x: torch.Tensor) -> list[torch.Tensor]:
    """[min, max, sum, m2] of a flat tensor as 0-d device tensors, m2 combined over chunks (Chan et al.)."""
    work = _work_dtype(x.dtype)
    scratch = _scratch_for(x.device, work)
    if x.numel() <= CHUNK:  # one chunk: a third fewer torch calls (each costs microseconds, whatever its size)
        buf = scratch[:x.numel()]
        if x.dtype != work:
            x = buf.copy_(x)
        lo, hi = torch.aminmax(x)
        total = x.sum()
        torch.sub(x, total, alpha=1 / x.numel(), out=buf)  # centred: no cancellation when |mean| >> std
        return [lo, hi, total, torch.dot(buf, buf)]
    lo, hi = torch.aminmax(x) if x.dtype.is_floating_point else torch.aminmax(x.to(work))
    sums, m2s, sizes = [], [], []
    for start in range(0, x.numel(), CHUNK):
        chunk = x[start:start + CHUNK]
        n = chunk.numel()
        buf = scratch[:n]
        if chunk.dtype != work:
            buf.copy_(chunk)
            chunk = buf
        total = chunk.sum()
        torch.sub(chunk, total / n, out=buf)  # centred: no cancellation when |mean| >> std
        sums.append(total)
        m2s.append(torch.dot(buf, buf))
        sizes.append(n)
    if len(sums) == 1:
        return [lo, hi, sums[0], m2s[0]]
    chunk_sums, chunk_m2 = torch.stack(sums).double(), torch.stack(m2s).double()
    counts = torch.tensor(sizes, dtype=torch.float64, device=x.device)
    total = chunk_sums.sum()
    spread = chunk_sums / counts - total / x.numel()
    return [lo, hi, total, chunk_m2.sum() + (counts * spread * spread).sum()]


def _group_matrix(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors (one dtype and shape) stacked as the rows of a matrix of ``dtype``, in reusable memory: a decode
    step stacks the same few hundred small tensors every step, and fresh matrices cost allocations (page faults on
    CPU) that the reductions themselves do not."""
    first = tensors[0]
    k, n = len(tensors), first.numel()
    stacked = _scratch_for(first.device, first.dtype, "stack", k * n)[:k * n].view(k, *first.shape)
    torch.stack(tensors, out=stacked)
    matrix = stacked.view(k, n)
    if first.dtype != dtype:
        matrix = _scratch_for(first.device, dtype, "work", k * n)[:k * n].view(k, n).copy_(matrix)
    return matrix


def _reduce_group(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A [k, 4] table of small tensors of one dtype and shape, stacked into one matrix: a few row-wise
    reductions in all, whatever k is (decode steps are hundreds of tensors of a handful of shapes)."""
    if tensors[0].is_complex():
        matrix = torch.view_as_real(torch.stack(tensors)).reshape(len(tensors), -1)
        matrix = matrix.to(_work_dtype(matrix.dtype))
    else:
        matrix = _group_matrix(tensors, _work_dtype(tensors[0].dtype))
    return _reduce_matrix(matrix, matrix)  # centred in place: the matrix is ours


def _reduce_stacked(stacked: torch.Tensor) -> list[torch.Tensor]:
    """[k, 4] tables of a matrix whose rows are copies (of one dtype and shape, not complex), in blocks of at most
    ``BLOCK`` elements. The matrix is read, not written (a row whose table is not finite is looked at again)."""
    k = stacked.shape[0]
    n = stacked[0].numel()
    matrix = stacked.reshape(k, n)
    work = _work_dtype(matrix.dtype)
    rows = max(1, BLOCK // max(n, 1))
    tables = []
    for start in range(0, k, rows):
        block = matrix[start:start + rows]
        size = block.numel()
        scratch = _scratch_for(block.device, work, "work" if block.dtype != work else "stack", size)
        out = scratch[:size].view(block.shape)
        if block.dtype != work:
            block = out.copy_(block)
        tables.append(_reduce_matrix(block, out))
    return tables


def _reduce_matrix(matrix: torch.Tensor, centred: torch.Tensor) -> torch.Tensor:
    """The [k, 4] table of the rows of a [k, n] matrix of a work dtype; ``centred`` (the matrix itself, or
    scratch of its shape) takes the rows minus their means."""
    # Not aminmax(dim=1): row-wise it is ~10x slower than amin and amax on CPU (measured on decode shapes).
    lo, hi = matrix.amin(dim=1), matrix.amax(dim=1)
    total = matrix.sum(dim=1)
    torch.sub(matrix, (total / matrix.shape[1]).unsqueeze(1), out=centred)
    m2 = torch.linalg.vector_norm(centred, dim=1).square_()
    return torch.stack([lo, hi, total, m2], dim=1).to(torch.float64)


def reduce_now(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The ``[4]`` row (min, max, sum, m2) of one tensor larger than ``GROUP_MAX`` elements, on its device and
    without a synchronisation, and the count of values it reduced (:func:`batch_stats` takes both). A capture
    reduces such a tensor where its hook fires, from the model's own tensor, instead of copying it to reduce
    later (the copy was a third of the statistics' cost on prefill). The row is made float64 at the flush, with
    the others."""
    flat = _flat(t)
    return torch.stack(_reduce_large(flat)), flat.numel()


def _order_groups(tensors: Sequence[torch.Tensor | None], reduced: Mapping[int, tuple[torch.Tensor, int]]
                  ) -> tuple[list[list[int]], list[int], list[int], list[int]]:
    """Indices of the tensors by how they are reduced: groups of small ones of one dtype and shape, large ones,
    empty ones (those in ``reduced``, and None ones, the rows of stacked matrices, are none of these); and every
    tensor's element count (0 for a None one)."""
    groups: dict[tuple[torch.dtype, torch.Size], list[int]] = {}
    large: list[int] = []
    empty: list[int] = []
    numels: list[int] = []
    for i, t in enumerate(tensors):
        if i in reduced:
            numels.append(reduced[i][1])
            continue
        if t is None:
            numels.append(0)
            continue
        n = t.numel()
        numels.append(n * 2 if t.is_complex() else n)
        if n == 0:
            empty.append(i)
        elif n <= GROUP_MAX:
            key = (t.dtype, t.shape)
            group = groups.get(key)
            if group is None:
                groups[key] = [i]
            else:
                group.append(i)
        else:
            large.append(i)
    return list(groups.values()), large, empty, numels


def _reduce_ordered(tensors: Sequence[torch.Tensor | None], groups: list[list[int]], large: list[int],
                    empty: list[int], reduced: Sequence[torch.Tensor] = (),
                    stacked: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The [k, 4] table of :func:`reduce_rows`, its rows in the order ``stacked`` (matrices of copies, row by
    row), groups, large, ``reduced`` (rows made already), empty."""
    device = (stacked or reduced or [t for t in tensors if t is not None])[0].device
    parts: list[torch.Tensor] = []
    for matrix in stacked:
        parts.extend(_reduce_stacked(matrix))
    for indices in groups:
        rows = max(1, BLOCK // tensors[indices[0]].numel())  # type: ignore[union-attr]
        parts.extend(_reduce_group([tensors[i] for i in indices[start:start + rows]])  # type: ignore[misc]
                     for start in range(0, len(indices), rows))
    if large:
        parts.append(torch.stack([s for i in large for s in _reduce_large(_flat(tensors[i]))])  # type: ignore[arg-type]
                     .to(torch.float64).reshape(-1, 4))
    if reduced:
        parts.append(torch.stack(list(reduced)).to(torch.float64))
    if empty:
        parts.append(torch.full((len(empty), 4), math.nan, dtype=torch.float64, device=device))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def reduce_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One ``[len(tensors), 4]`` float64 table (min, max, sum, m2) on the tensors' device, without any
    device synchronisation. The tensors must share a device; empty ones give rows of NaN."""
    if not tensors:
        return torch.empty(0, 4, dtype=torch.float64)
    groups, large, empty, _ = _order_groups(tensors, {})
    table = _reduce_ordered(tensors, groups, large, empty)
    order = [i for indices in groups for i in indices] + large + empty
    if order != list(range(len(tensors))):
        inverse = [0] * len(order)
        for row, i in enumerate(order):
            inverse[i] = row
        table = table[torch.tensor(inverse, device=table.device)]
    return table


def read_back(table: torch.Tensor) -> Any:
    """The statistics table on the host (nested lists of floats): the one device-to-host transfer per batch of
    tensors."""
    return table.tolist()


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """min, max, mean, population std, L2 norm, NaN and Inf counts of ``t`` as plain Python numbers.

    The slow path, for any tensor: with NaN/Inf present, the other statistics are over the finite values."""
    n = t.numel()
    if n == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "norm": 0.0, "nan": 0, "inf": 0}
    # float64: finite float32 values near the dtype's limit (attention masks of finfo.min) overflow a float32 sum
    x = _flat(t).to(torch.float64)
    nan = inf = 0
    if not bool(torch.isfinite(x).all()):
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return {"min": None, "max": None, "mean": None, "std": None, "norm": None, "nan": nan, "inf": inf}
    return _row_dict(read_back(_finish_rows(reduce_rows([x]), [x]))[0], nan, inf)


def _finish_rows(table: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The manifest statistics of a whole table, on its device: ``[k, 6]`` of min, max, mean, std, norm and
    1.0 where the row is finite (0.0 where it shows NaN, Inf or overflow, or the tensor is empty)."""
    return _finish_table(table, torch.tensor([t.numel() * (2 if t.is_complex() else 1) for t in tensors],
                                             dtype=torch.float64, device=table.device))


def _finish_table(table: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    lo, hi, total, m2 = table.unbind(1)
    mean = total / numel
    std = torch.sqrt(torch.clamp(m2 / numel, min=0.0))
    norm = torch.sqrt(torch.clamp(m2, min=0.0) + numel * mean * mean)
    finite = torch.isfinite(table).all(dim=1) & (numel > 0)
    return torch.stack([lo, hi, mean, std, norm, finite.to(torch.float64)], dim=1)


def _row_dict(row: Sequence[float], nan: int = 0, inf: int = 0) -> dict[str, Any]:
    lo, hi, mean, std, norm = row[:5]
    return {"min": lo, "max": hi, "mean": mean, "std": std, "norm": norm, "nan": nan, "inf": inf}


def batch_stats(tensors: Sequence[torch.Tensor | None], reduced: Mapping[int, tuple[torch.Tensor, int]] | None = None,
                gone: Collection[int] = (), stacked: Sequence[tuple[torch.Tensor, Sequence[int]]] = ()
                ) -> list[dict[str, Any]]:
    """:func:`tensor_stats` of many tensors of one device, with one read-back for all finite ones (only a
    tensor whose row shows NaN/Inf or overflow is looked at again, by :func:`tensor_stats`).

    ``reduced`` holds, by index, the row (:func:`reduce_now`) and element count of tensors reduced already:
    their tensor is only looked at again when the row is not finite, unless its index is in ``gone`` (it was
    changed in place since it was reduced): then its statistics are :data:`~llmdiff.store.schema.UNKNOWN_STATS`.
    ``stacked`` holds matrices of copies already laid out as rows (not complex), each with the indices its rows
    stand for; the tensors at those indices are None."""
    if not tensors:
        return []
    reduced = reduced or {}
    groups, large, empty, numels = _order_groups(tensors, reduced)
    rest = [i for indices in groups for i in indices] + large + list(reduced) + empty
    order = [i for _, indices in stacked for i in indices] + rest
    table = _reduce_ordered(tensors, groups, large, empty, [row for row, _ in reduced.values()],
                            [matrix for matrix, indices in stacked if len(indices)])
    # each stacked matrix's row size repeated over its rows, then each other tensor's size
    sizes = [math.prod(matrix.shape[1:]) for matrix, _ in stacked] + [numels[i] for i in rest]
    repeats = [len(indices) for _, indices in stacked] + [1] * len(rest)
    counts = torch.tensor(sizes, dtype=torch.float64, device=table.device).repeat_interleave(
        torch.tensor(repeats, device=table.device), output_size=len(order))  # known size: no device sync
    # One flat list of floats: a list per row would be thousands of objects Python's collector tracks.
    flat = read_back(_finish_table(table, counts).reshape(-1))
    out: list[dict[str, Any]] = [{}] * len(tensors)
    for i, lo, hi, mean, std, norm, finite in zip(order, flat[0::6], flat[1::6], flat[2::6], flat[3::6], flat[4::6],
                                                  flat[5::6], strict=True):
        if finite:
            out[i] = {"min": lo, "max": hi, "mean": mean, "std": std, "norm": norm, "nan": 0, "inf": 0}
        elif i in gone:
            out[i] = dict(UNKNOWN_STATS)
        else:
            tensor = tensors[i]
            out[i] = tensor_stats(tensor if tensor is not None else _stacked_row(stacked, i))
    return out


def _stacked_row(stacked: Sequence[tuple[torch.Tensor, Sequence[int]]], index: int) -> torch.Tensor:
    """The row standing for tensor ``index`` in ``stacked`` (looked for only when its statistics show NaN/Inf)."""
    for matrix, indices in stacked:
        if index in indices:
            return matrix[list(indices).index(index)]
    raise KeyError(index)


def content_hash(t: torch.Tensor) -> str:
    """A hash of the tensor's dtype, shape and bytes, for bit-exactness checks across runs."""
    return content_hashes([t])[0]


def content_hashes(tensors: Sequence[torch.Tensor]) -> list[str]:
    """:func:`content_hash` of each tensor, with one read-back per device: a device's tensors are laid end to
    end as bytes there, that one buffer comes to the host (:func:`host_bytes`), and each tensor's part of it
    is hashed. (One transfer a tensor was one device synchronisation a tensor.)"""
    out = [""] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        parts = [tensors[i].detach().contiguous().reshape(-1).view(torch.uint8) for i in indices]
        data = host_bytes(torch.cat(parts)) if len(parts) > 1 else host_bytes(parts[0])
        offset = 0
        for i, part in zip(indices, parts, strict=True):
            t, n = tensors[i], part.numel()
            digest = hashlib.blake2b(digest_size=16)
            digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(data[offset:offset + n].data)
            out[i] = digest.hexdigest()
            offset += n
    return out


def host_bytes(flat: torch.Tensor) -> np.ndarray:
    """A flat uint8 tensor's bytes on the host: the one device-to-host transfer of :func:`content_hashes`."""
    return flat.cpu().numpy()
