"""Tensor-parallel dumps: one rank folder each, seen as the one unsharded run they add up to.

A tensor-parallel engine writes one process folder per TP rank. Each rank's entry holds either the
whole tensor (replicated: norms, reduced outputs, the residual stream) or its piece of it
(sharded: a column-parallel output, a row-parallel input, attention heads). How each entry is sharded
comes from the layout the rank recorded at capture time, read through the engine's own module
(:func:`llmdiff.engines.shard_of`); nothing is guessed from shapes.

:func:`unshard` returns a view dump of one process: replicated entries are rank 0's, sharded ones
are reassembled on load (fused q/k/v and gate/up slices de-interleaved part by part), and each
reassembled entry remembers which columns came from which rank (``Entry.shards``), so a failing
tensor can name the rank whose slice carries the error (:func:`rank_blame`, called where the pair is
measured).

:func:`across_ranks` pairs every replicated entry of rank ``r`` with rank 0's: compared as usual,
a rank that departs from its peers is localized like any other divergence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmdiff.compare.results import Culprit, EntryResult
from llmdiff.engines import Shard, shard_of
from llmdiff.store.reader import DATA_MISSING, Dump, ProcessDump
from llmdiff.store.schema import Entry

if TYPE_CHECKING:
    import torch

Key = tuple[int, str, int, str, str]  # step, module, call, part, path


def process_engine(proc: ProcessDump) -> dict[str, Any]:
    """What a process recorded about the engine holding its model (``{}`` for none)."""
    for model in proc.info.get("models") or []:
        engine = model.get("engine") if isinstance(model, dict) else None
        if isinstance(engine, dict):
            return engine
    return {}


def tp_ranks(dump: Dump) -> dict[int, ProcessDump]:
    """The dump's processes by tensor-parallel rank, when it holds a run of TP size > 1 ({} otherwise)."""
    ranks: dict[int, ProcessDump] = {}
    sizes = set()
    for proc in dump.processes:
        engine = process_engine(proc)
        rank, size = engine.get("tp_rank"), engine.get("tp_size")
        if rank is None:  # no distributed state was reachable at capture: the parallel layers' own record
            layer: dict[str, Any] = next(iter((engine.get("parallel") or {}).values()), {})
            rank, size = layer.get("tp_rank"), layer.get("tp_size")
        if isinstance(rank, int) and isinstance(size, int) and size > 1:
            ranks.setdefault(rank, proc)
            sizes.add(size)
    return ranks if len(sizes) == 1 and len(ranks) > 1 else {}


def _key(e: Entry) -> Key:
    return (e.step, e.module, e.call, e.part, e.path)


def combine_stats(parts: Sequence[tuple[dict[str, Any], int]], combine: str) -> dict[str, Any] | None:
    """The statistics of the whole from its shards' ``(stats, numel)`` (concatenated shards: exact up to
    rounding); None for partial sums, whose statistics do not follow from the parts'."""
    if combine != "concat" or any(s is None for s, _ in parts):
        return None
    counts = [n - int(s.get("nan") or 0) - int(s.get("inf") or 0) for s, n in parts]
    finite = [(s, n) for (s, _), n in zip(parts, counts, strict=True) if n > 0 and s.get("mean") is not None]
    total = sum(n for _, n in finite)
    out: dict[str, Any] = {"nan": sum(int(s.get("nan") or 0) for s, _ in parts),
                           "inf": sum(int(s.get("inf") or 0) for s, _ in parts)}
    if not total:
        return {**out, "min": None, "max": None, "mean": None, "std": None, "norm": 0.0 if not out["nan"] else None}
    mean = sum(s["mean"] * n for s, n in finite) / total
    var = sum(n * ((s.get("std") or 0.0) ** 2 + (s["mean"] - mean) ** 2) for s, n in finite) / total
    return {**out, "min": min(s["min"] for s, _ in finite), "max": max(s["max"] for s, _ in finite),
            "mean": mean, "std": math.sqrt(max(var, 0.0)),
            "norm": math.sqrt(sum((s.get("norm") or 0.0) ** 2 for s, _ in finite))}


@dataclass
class _Recipe:
    entries: list[Entry]  # one a rank, in rank order
    shards: list[Shard]


@dataclass
class Unsharded:
    """A TP dump as one run: the view, and what a report should say about how it was made."""

    dump: Dump
    size: int
    notes: list[str] = field(default_factory=list)


def add_up(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of same-shaped tensors, accumulated in float64, in the first one's dtype."""
    import torch  # here and below, not at the top: a comparison of statistics imports no torch

    total = tensors[0].to(torch.float64) if tensors[0].is_floating_point() else tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total.to(tensors[0].dtype)


def _assemble(tensors: list[torch.Tensor], shards: list[Shard]) -> torch.Tensor:
    if shards[0].combine == "sum":
        return add_up(tensors)
    import torch

    pieces = [torch.split(t, list(s.widths), dim=-1) for t, s in zip(tensors, shards, strict=True)]
    return torch.cat([p[j] for j in range(len(shards[0].widths)) for p in pieces], dim=-1)


def _columns(shards: list[Shard]) -> tuple[tuple[int, int, int], ...]:
    """(rank, first column, end) of each rank's slices in the reassembled last dimension."""
    spans, start = [], 0
    for j in range(len(shards[0].widths)):
        for rank, s in enumerate(shards):
            spans.append((rank, start, start + s.widths[j]))
            start += s.widths[j]
    return tuple(spans)


def unshard(dump: Dump) -> Unsharded | None:
    """``dump`` seen as one unsharded run (None when it is not a tensor-parallel dump)."""
    ranks = tp_ranks(dump)
    if not ranks:
        return None
    size = len(ranks)
    order = [ranks[r] for r in sorted(ranks)]
    base = order[0]
    engine = str(process_engine(base).get("name") or "")
    layouts = [process_engine(p).get("parallel") or {} for p in order]
    by_key = [{_key(e): e for e in p.entries} for p in order[1:]]
    recipes: dict[str, _Recipe] = {}
    entries: list[Entry] = []
    lone, odd = 0, []
    for e in base.entries:
        shard = shard_of(engine, e.module, e.part, e.path, layouts[0])
        if shard is None:
            entries.append(e)  # replicated: rank 0's (across_ranks checks the others agree)
            continue
        peers = [k.get(_key(e)) for k in by_key]
        shards = [shard, *(shard_of(engine, e.module, e.part, e.path, lay) for lay in layouts[1:])]
        group = [e, *peers]
        if any(p is None for p in peers):
            lone += 1
            entries.append(dataclasses.replace(e, note="a shard of this tensor is missing on another rank",
                                               data=None, stats=None))
            continue
        held = [x for x in group if x is not None]
        widths_ok = all(s is not None and s.combine == shard.combine and len(s.widths) == len(shard.widths)
                        and (s.combine == "sum" or sum(s.widths) == (x.shape[-1] if x.shape else -1))
                        for s, x in zip(shards, held, strict=True))
        if not widths_ok:
            odd.append(e.name)
            entries.append(dataclasses.replace(e, note="its recorded shard layout does not fit its shape",
                                               data=None, stats=None))
            continue
        whole = [s for s in shards if s is not None]
        shape = list(e.shape)
        if shard.combine == "concat":
            shape[-1] = sum(sum(s.widths) for s in whole)
        key = str(len(recipes))
        has_data = all(x.data is not None for x in held)
        if has_data:
            recipes[key] = _Recipe(held, whole)
        stats = combine_stats([(x.stats, x.numel) for x in held], shard.combine)  # type: ignore[misc]
        lost = next((x.note for x in held if x.note == DATA_MISSING), None)  # a rank's shard file is damaged
        entries.append(dataclasses.replace(
            e, shape=shape, stats=stats, data={"file": "", "key": key} if has_data else None,
            note=lost or (None if has_data or stats is not None else "statistics of partial sums cannot be added up"),
            shards=_columns(whole) if shard.combine == "concat" else None))

    def load(entry: Entry) -> torch.Tensor:
        assert entry.data is not None
        recipe = recipes.get(entry.data["key"]) if entry.data["file"] == "" else None
        if recipe is None:
            return dump.load(entry)
        return _assemble([dump.load(x) for x in recipe.entries], recipe.shards)

    info = {**base.info, "unsharded": {"tp_size": size, "ranks": [p.folder.name for p in order]}}
    view = Dump(dump.path, dump.run, [ProcessDump(base.folder, info, entries, list(base.steps))],
                list(dump.problems), dump.format, loader=load)
    notes = [f"{dump.path}: tensor-parallel dump of {size} ranks, sharded tensors reassembled "
             f"({len(recipes)} entries), replicated ones taken from rank 0"]
    if lone:
        notes.append(f"{dump.path}: {lone} sharded entries lack a rank's shard and are not compared")
    if odd:
        notes.append(f"{dump.path}: {len(odd)} entries do not fit their recorded shard layout: {', '.join(odd[:3])}")
    return Unsharded(view, size, notes)


def across_ranks(dump: Dump) -> tuple[Dump, Dump] | None:
    """Two views that pair each replicated entry of every rank ``r > 0`` (target) with rank 0's (golden,
    renumbered ``r``), for an ordinary compare; None when ``dump`` is not tensor-parallel."""
    ranks = tp_ranks(dump)
    if not ranks:
        return None
    order = [ranks[r] for r in sorted(ranks)]
    engine = str(process_engine(order[0]).get("name") or "")
    layout = process_engine(order[0]).get("parallel") or {}
    replicated = [e for e in order[0].entries if shard_of(engine, e.module, e.part, e.path, layout) is None]
    golden: list[Entry] = []
    target: list[Entry] = []
    for rank, proc in enumerate(order[1:], 1):
        mine = {_key(e): e for e in proc.entries}
        for e in replicated:
            peer = mine.get(_key(e))
            golden.append(dataclasses.replace(e, rank=rank))
            if peer is not None:
                target.append(dataclasses.replace(peer, rank=rank))
    steps = [(dataclasses.replace(s, rank=rank)) for rank in range(1, len(order)) for s in order[0].steps]
    target_steps = [dataclasses.replace(s, rank=rank) for rank, p in enumerate(order[1:], 1) for s in p.steps]

    def view(entries: list[Entry], step_records: list[Any], folder: ProcessDump) -> Dump:
        return Dump(dump.path, dump.run, [ProcessDump(folder.folder, folder.info, entries, step_records)],
                    list(dump.problems), dump.format, loader=dump.load)

    return view(golden, steps, order[0]), view(target, target_steps, order[1])


def rank_errors(golden: torch.Tensor, target: torch.Tensor, shards: Sequence[tuple[int, int, int]]
                ) -> dict[int, float]:
    """Relative L2 error of each rank's columns of a reassembled tensor (all of a rank's slices together)."""
    import torch

    diff2: dict[int, float] = {}
    ref2: dict[int, float] = {}
    g = golden.to(torch.float64).reshape(-1, golden.shape[-1]) if golden.dim() else golden.to(torch.float64)
    t = target.to(torch.float64).reshape(g.shape)
    for rank, start, end in shards:
        diff2[rank] = diff2.get(rank, 0.0) + float(((t[:, start:end] - g[:, start:end]) ** 2).sum())
        ref2[rank] = ref2.get(rank, 0.0) + float((g[:, start:end] ** 2).sum())
    return {r: (math.sqrt(diff2[r] / ref2[r]) if ref2[r] else (0.0 if diff2[r] == 0 else math.inf)) for r in diff2}


def rank_blame(golden: torch.Tensor, target: torch.Tensor, shards: Sequence[tuple[int, int, int]],
               budget: float) -> tuple[dict[int, float], list[int]]:
    """Of a failing reassembled tensor: each rank's error (:func:`rank_errors`) and the ranks out of
    ``budget`` (the worst one when the failure is not in rel_l2)."""
    errors = rank_errors(golden, target, shards)
    worst = max(errors.values())
    return errors, sorted(r for r, err in errors.items() if err > budget) or [
        r for r, err in errors.items() if err == worst]


def culprit_ranks(culprits: Sequence[Culprit], results: Sequence[EntryResult]) -> None:
    """Each culprit's ``ranks``: those blamed in the reassembled outputs of its calls (any step)."""
    blamed: dict[tuple[int, str, int], set[int]] = {}
    for r in results:
        if r.ranks and not r.is_input:
            blamed.setdefault((r.rank, r.module, r.call), set()).update(r.ranks)
    for c in culprits:
        found = blamed.get((c.rank, c.module, c.call))
        if found:
            c.ranks = sorted(found)
