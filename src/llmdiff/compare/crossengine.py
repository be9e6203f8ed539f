"""Comparing two different engines: both dumps seen as canonical points, rows paired by (request, position).

When the golden and the target come from different engines (transformers and vLLM), names do not
pair and layouts differ. This module turns both dumps into *views*: dumps of canonical points
(:mod:`llmdiff.engines.canonical`) whose tensors are computed on demand from the engines' own
entries (sums, splits, row gathers), so the compare engine, the metrics and localization run on
them unchanged.

Rows are paired by (request, position), never by row index. The transformers side defines the units
of comparison: each of its steps (a prefill, one decode token, or one teacher-forced pass over a
whole sequence) is one request's run of positions. The engine side's rows for the same request and
positions are gathered from whichever of its steps computed them (continuous batching, chunked
prefill). Requests are matched by their prompt tokens (arrival order when no prompt matches).

In a view, an entry's ``rank`` is the request (the golden's order), its ``step`` the golden's step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmdiff.compare.results import DIVERGED, FAILING, INCOMPLETE, MATCH, MEASURED, Culprit, EntryResult, Tokens
from llmdiff.compare.unshard import add_up, process_engine
from llmdiff.engines import CANONICAL, canonical_sources
from llmdiff.engines.canonical import Ref, Source, points
from llmdiff.errors import DumpError
from llmdiff.store.reader import Dump, ProcessDump
from llmdiff.store.schema import Entry, StepRecord

if TYPE_CHECKING:
    import torch

ENGINES = tuple(CANONICAL)


def engine_of(dump: Dump) -> str:
    """The engine that wrote ``dump``: what its processes recorded, else transformers."""
    names = [process_engine(proc).get("name") for proc in dump.processes]
    return next((str(n) for n in names if n in ENGINES), "hf")


def _config(dump: Dump) -> dict[str, Any]:
    configs = [process_engine(proc).get("config") for proc in dump.processes]
    return next((dict(c) for c in configs if isinstance(c, dict)), {})


def _sizes_from(hf_dump: Dump) -> dict[str, Any]:
    """The widths of fused projections, read off transformers' own q, k and gate projection outputs (for an
    engine dump that records no model config, such as SGLang's dumper)."""
    widths: dict[str, int] = {}
    for e in hf_dump.entries:
        for name, key in (("q_proj", "q_size"), ("k_proj", "kv_size"), ("gate_proj", "intermediate_size")):
            if e.part == "output" and e.module.endswith(f".{name}") and e.shape:
                widths.setdefault(key, e.shape[-1])
    return widths if len(widths) == 3 else {}


def _layers(entries: Sequence[Entry]) -> int:
    found = [int(e.module.split(".")[2]) for e in entries if e.module.startswith("model.layers.")
             and e.module.split(".")[2].isdigit()]
    return max(found) + 1 if found else 0


@dataclass
class _Side:
    dump: Dump
    engine: str
    sources: dict[tuple[str, str], Source]
    by_key: dict[tuple[int, str, str, str], Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for e in self.dump.entries:  # one process (a tensor-parallel dump is unsharded before)
            self.by_key.setdefault((e.step, e.module, e.part, e.path), e)

    def refs_at(self, step: int, source: Source) -> list[Entry] | None:
        """The own entries ``source`` needs at ``step`` (None when the dump lacks them)."""
        found = [e if e is not None and e.data is not None else None  # statistics cannot be gathered by row
                 for e in (self.by_key.get((step, r.module, r.part, r.path)) for r in source.refs)]
        if source.transform == "sum":
            return None if any(f is None for f in found) else [f for f in found if f is not None]
        first = next((f for f in found if f is not None), None)
        return None if first is None else [first]

    def tensor(self, entries: list[Entry], source: Source) -> torch.Tensor:
        loaded = [self.dump.load(e) for e in entries]
        if source.transform == "sum":
            return add_up(loaded)
        if source.transform == "split":
            import torch  # here and in load, not at the top: a comparison of statistics imports no torch

            return torch.split(loaded[0], list(source.sizes), dim=-1)[source.index]
        return loaded[0]


def _window(shards: tuple[tuple[int, int, int], ...] | None, source: Source
            ) -> tuple[tuple[int, int, int], ...] | None:
    """The ranks' columns (see ``Entry.shards``) of the slice of the last dimension ``source`` takes."""
    if not shards or source.transform != "split":
        return shards if source.transform is None else None
    start = sum(source.sizes[:source.index])
    end = start + source.sizes[source.index]
    inside = tuple((rank, max(a, start) - start, min(b, end) - start) for rank, a, b in shards if a < end and b > start)
    return inside or None


def _describe(entries: list[Entry], source: Source) -> str:
    refs = tuple(Ref(e.module, e.part, e.path) for e in entries)
    return Source(refs, source.transform, source.sizes, source.index, source.layout).describe()


@dataclass
class _Unit:
    """One golden step of one request: the positions it covers and the tokens fed at them."""

    step: int
    request: int
    batch: int
    positions: list[int]
    tokens: list[int]


def _hf_units(dump: Dump) -> list[_Unit]:
    units: list[_Unit] = []
    open_requests: dict[int, int] = {}  # batch row -> request index
    ends: dict[int, int] = {}
    count = 0
    for step in sorted(dump.steps, key=lambda s: (s.rank, s.step)):
        ids = step.token_ids
        if not (isinstance(ids, list) and ids and all(isinstance(r, list) for r in ids)):
            continue
        for b, row in enumerate(ids):
            tokens = [int(t) for t in row]
            if len(tokens) > 1 or b not in open_requests:  # a prefill (or teacher-forced pass) starts a request
                open_requests[b], ends[count] = count, 0
                count += 1
            request = open_requests[b]
            start = ends[request]
            units.append(_Unit(step.step, request, b, list(range(start, start + len(tokens))), tokens))
            ends[request] = start + len(tokens)
    return units


def _engine_units(index: _EngineIndex) -> list[_Unit]:
    """An engine golden's units: each request's rows of each step, requests numbered by arrival."""
    number = {rid: i for i, rid in enumerate(sorted(index.arrival, key=lambda r: index.arrival[r]))}
    grouped: dict[tuple[int, str], list[int]] = {}
    for (rid, position), (step, _) in index.rows.items():
        grouped.setdefault((step, rid), []).append(position)
    units = []
    for (step, rid), positions in sorted(grouped.items(), key=lambda kv: (kv[0][0], number[kv[0][1]])):
        positions.sort()
        seen = index.tokens.get(rid, {})
        units.append(_Unit(step, number[rid], -1, positions, [seen.get(p, -1) for p in positions]))
    return units


@dataclass
class _EngineIndex:
    """For a flat-token engine (vLLM): where each (request, position) row is, and each logits row."""

    rows: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    logits: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    tokens: dict[str, dict[int, int]] = field(default_factory=dict)
    arrival: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _engine_index(dump: Dump) -> _EngineIndex:
    index = _EngineIndex()
    for step in sorted(dump.steps, key=lambda s: s.step):
        if not step.requests or step.positions is None:
            index.problems.append(f"step {step.step} has no request metadata: its rows cannot be attributed")
            continue
        ids = step.token_ids if isinstance(step.token_ids, list) else []
        for request in step.requests:
            rid, start, rows = str(request["id"]), int(request["start"]), int(request["rows"])
            arrival = request.get("arrival")
            index.arrival.setdefault(rid, int(arrival) if arrival is not None else len(index.arrival))
            for row in range(start, start + rows):
                position = int(step.positions[row])
                index.rows[rid, position] = (step.step, row)
                if row < len(ids):
                    index.tokens.setdefault(rid, {})[position] = int(ids[row])
            computed, prompt = request.get("computed"), request.get("prompt_tokens")
            last = int(computed) + rows - 1 if computed is not None else int(step.positions[start + rows - 1])
            if request.get("logits_row") is not None and (prompt is None or last + 1 >= int(prompt)):
                index.logits[rid, last] = (step.step, int(request["logits_row"]))
    return index


def _match_requests(units: Sequence[_Unit], index: _EngineIndex) -> dict[int, str]:
    """Golden request → engine request id: the same prompt tokens, earliest arrival first."""
    prompts: dict[int, list[int]] = {}
    for u in units:
        if u.positions[0] == 0:
            prompts.setdefault(u.request, u.tokens)
    by_arrival = sorted(index.arrival, key=lambda r: index.arrival[r])
    taken: set[str] = set()
    matched: dict[int, str] = {}
    for request, prompt in sorted(prompts.items()):
        for rid in by_arrival:
            seen = index.tokens.get(rid, {})
            if rid not in taken and all(seen.get(p) == t for p, t in enumerate(prompt[:len(seen)])) and seen:
                matched[request] = rid
                taken.add(rid)
                break
    for request in sorted(prompts):  # no prompt matched: pair by arrival order, the fed tokens will tell
        if request not in matched:
            free = [r for r in by_arrival if r not in taken]
            if free:
                matched[request] = free[0]
                taken.add(free[0])
    return matched


@dataclass
class CrossEngine:
    """The two views and what a report needs to know about the pairing."""

    golden: Dump
    target: Dump
    engines: tuple[str, str]
    requests: list[dict[str, Any]]
    own_names: dict[str, tuple[str | None, str | None]]  # canonical module -> (golden's, target's) own module
    notes: list[str]
    #: a side holds statistics only: a batched tensor's statistics cannot be split by request, so it pairs nothing
    statistics_only: bool = False


class _View:
    """Builds one side's view dump: entries with recipes, loaded through ``Dump.loader``."""

    def __init__(self, side: _Side) -> None:
        self.side = side
        self.entries: list[Entry] = []
        self.recipes: list[tuple[list[tuple[list[Entry], list[int]]], Source, int | None]] = []
        self.steps: dict[tuple[int, int], StepRecord] = {}

    def add(self, request: int, step: int, module: str, part: str, source: Source,
            parts: list[tuple[list[Entry], list[int]]], batch: int | None, shape: list[int], dtype: str) -> Entry:
        key = str(len(self.recipes))
        entry = Entry(seq=len(self.entries), rank=request, step=step, module=module, type="canonical", call=0,
                      part=part, path="", shape=shape, dtype=dtype, device="cpu", stats=None,
                      data={"file": "", "key": key}, source=_describe(parts[0][0], source),
                      shards=_window(parts[0][0][0].shards, source) if len(parts[0][0]) == 1 else None)
        self.recipes.append((parts, source, batch))
        self.entries.append(entry)
        record = self.steps.get((request, step))
        if record is not None:
            record.entries += 1
        return entry

    def load(self, entry: Entry) -> torch.Tensor:
        assert entry.data is not None
        parts, source, batch = self.recipes[int(entry.data["key"])]
        chunks = []
        for own, rows in parts:
            tensor = self.side.tensor(own, source)
            if batch is not None:  # [batch, seq, ...]: this request's row of the batch
                tensor = tensor[batch] if tensor.dim() >= 2 else tensor
            chunks.append(tensor[rows])
        if len(chunks) == 1:
            return chunks[0]
        import torch

        return torch.cat(chunks)

    def dump(self, base: Dump) -> Dump:
        proc = ProcessDump(base.path, {"format": base.format, "view": "canonical"}, self.entries,
                           sorted(self.steps.values(), key=lambda s: (s.rank, s.step)))
        return Dump(base.path, base.run, [proc], list(base.problems), base.format, loader=self.load)


def _own_shape(entries: list[Entry], source: Source) -> list[int]:
    shape = list(entries[0].shape)
    if source.transform == "split" and shape:
        shape[-1] = source.sizes[source.index]
    return shape


def _same_schedule(golden: Dump, target: Dump) -> bool:
    """Both runs fed the same tokens in the same steps, as far as both go (then entries pair by name, step by
    step): a run that stopped early, or a dump cut short, is the other's schedule up to where it ends."""
    def schedule(dump: Dump) -> list[Any]:
        return [(s.step, s.token_ids) for s in sorted(dump.steps, key=lambda s: (s.rank, s.step)) if s.rank == 0]

    ours, theirs = schedule(golden), schedule(target)
    both = min(len(ours), len(theirs))
    return ours[:both] == theirs[:both]


def cross_engine_views(golden: Dump, target: Dump, engines: tuple[str | None, str | None] = (None, None)
                       ) -> CrossEngine | None:
    """Views of two dumps paired by canonical point and (request, position): dumps of two different engines,
    or of one flat-token engine whose runs batched the requests differently (a TP=3 run that scheduled its
    prompts in other steps than the TP=1 run). None when entries pair by module name, step by step."""
    names = (engines[0] or engine_of(golden), engines[1] or engine_of(target))
    if names[0] == names[1] and (names[0] == "hf" or _same_schedule(golden, target)
                                 or not all(s.requests and s.positions is not None
                                            for d in (golden, target) for s in d.steps)):
        return None
    # The transformers side (else the golden) defines the units rows are paired by.
    flip = names[0] != "hf" and names[1] == "hf"
    unit_dump, other_dump = (target, golden) if flip else (golden, target)
    unit_engine, other_engine = (names[1], names[0]) if flip else names
    layers = max(_layers(unit_dump.entries), _layers(other_dump.entries))
    sides = []
    for dump, engine in ((unit_dump, unit_engine), (other_dump, other_engine)):
        config = {} if engine == "hf" else (_config(dump) or _config(unit_dump if dump is other_dump else other_dump)
                                            or _sizes_from(unit_dump if unit_engine == "hf" else other_dump))
        if engine != "hf" and not config:
            raise DumpError(f"{dump.path}: no model config recorded by the engine, and the transformers side "
                            "has no q/k/gate projection outputs to take the widths of its fused projections from")
        try:
            sides.append(_Side(dump, engine, canonical_sources(engine, layers, config)))
        except (KeyError, TypeError, ValueError) as exc:
            raise DumpError(f"{dump.path}: the recorded model config cannot split fused projections "
                            f"({type(exc).__name__}: {exc})") from None
    unit_side, other_side = sides
    unit_index = None if unit_engine == "hf" else _engine_index(unit_dump)
    units = _hf_units(unit_dump) if unit_index is None else _engine_units(unit_index)
    index = _engine_index(other_dump)
    matched = _match_requests(units, index)
    unit_ids = {} if unit_index is None else {
        n: rid for n, rid in enumerate(sorted(unit_index.arrival, key=lambda r: unit_index.arrival[r]))}
    unit_view, other_view = _View(unit_side), _View(other_side)
    own: dict[str, tuple[str | None, str | None]] = {}
    unrun: dict[int, int] = {}  # request -> unit steps the other side ran none of
    for unit in units:
        rid = matched.get(unit.request)
        # the tokens fed at the positions both ran (a teacher-forced pass includes the last sampled token,
        # which the engine never fed; an engine that stopped early ran none of the later ones)
        seen = index.tokens.get(rid, {}) if rid is not None else {}
        both = [i for i, p in enumerate(unit.positions) if p in seen]
        if not both:
            unrun[unit.request] = unrun.get(unit.request, 0) + 1
        fed = ([unit.tokens[i] for i in both], [seen[unit.positions[i]] for i in both])
        for view, tokens in ((unit_view, fed[0]), (other_view, fed[1])):
            view.steps[unit.request, unit.step] = StepRecord(unit.request, unit.step, tokens, 0)
        located = (_Locator(unit_side, unit_index, unit_ids.get(unit.request), unit),
                   _Locator(other_side, index, rid, unit))
        for module, part in points(layers):
            _pair_point(unit, module, part, located, (unit_view, other_view), own)
    used = {(e.module, e.part, e.path) for view in (unit_view, other_view)
            for parts, _, _ in view.recipes for own_entries, _ in parts for e in own_entries}
    what = "cross-engine compare" if names[0] != names[1] else f"{names[0]} runs batched differently"
    notes = [f"{what} ({names[0]} golden, {names[1]} target): canonical points paired by "
             "(request, position); a view's rank is the request"]
    statistics_only = False
    for side in sides:
        unused = [e for e in side.dump.entries if (e.module, e.part, e.path) not in used]
        if unused and all(e.data is None for e in side.dump.entries):
            statistics_only = True
            notes.append(f"{side.engine}: its {len(unused)} entries hold statistics only, and the statistics of a "
                         "batched tensor cannot be split by request: capture full tensors (mode tensor) to pair "
                         "runs that batched differently")
        elif unused:
            touched = {e.module for e in side.dump.entries if (e.module, e.part, e.path) in used}
            idle = sorted({_role(e.module) or "<root>" for e in unused if e.module not in touched})
            notes.append(f"{side.engine}: {len(unused)} captured entries hold no canonical point and are not compared"
                         + (f"; modules with none: {', '.join(idle[:6])}{', ...' if len(idle) > 6 else ''}"
                            if idle else ""))
    notes += [f"{other_engine}: {p}" for p in index.problems[:3]]
    notes += [f"{unit_engine}: {p}" for p in (unit_index.problems[:3] if unit_index is not None else [])]
    requests = []
    for request in sorted({u.request for u in units}):
        mine = [u for u in units if u.request == request]
        requests.append({"request": request, "target_id" if not flip else "golden_id": matched.get(request),
                         **({"golden_id": unit_ids.get(request)} if unit_ids else {}),
                         "prompt_tokens": len(mine[0].tokens), "steps": [u.step for u in mine]})
    for request, count in sorted(unrun.items()):
        if request in matched:
            notes.append(f"request {request}: the {other_engine} side ran none of the positions of {count} "
                         "step(s) of the other (its generation ended sooner): their points are one-sided")
    if any(u.request not in matched for u in units):
        notes.append("some requests have no request in the other dump: their points are one-sided")
    views = (unit_view.dump(unit_dump), other_view.dump(other_dump))
    owned = {m: ((g, t) if not flip else (t, g)) for m, (g, t) in own.items()}
    return CrossEngine(views[1] if flip else views[0], views[0] if flip else views[1],
                       (names[0], names[1]), requests, owned, notes, statistics_only)


def _role(module: str) -> str:
    from llmdiff.compare.localize import role

    return role(module)


@dataclass
class _Locator:
    """Where one side holds the rows of one unit: a transformers step's batch row, or a flat-token
    engine's rows (found by request and position in whichever steps computed them)."""

    side: _Side
    index: _EngineIndex | None  # None: transformers
    rid: str | None
    unit: _Unit

    def rows(self, source: Source) -> dict[int, tuple[int, int]] | None:
        """Position index in the unit -> (step, row) for the positions this side holds."""
        positions = self.unit.positions
        if self.index is None:
            entries = self.side.refs_at(self.unit.step, source)
            if entries is None:
                return None
            seq = entries[0].shape[1] if len(entries[0].shape) >= 2 else len(positions)
            if seq == len(positions):
                return {i: (self.unit.step, i) for i in range(len(positions))}
            if seq == 1:  # generate's logits: the last position only
                return {len(positions) - 1: (self.unit.step, 0)}
            return None
        if self.rid is None:
            return None
        where = self.index.logits if source.layout == "logits" else self.index.rows
        found = {i: where[self.rid, p] for i, p in enumerate(positions) if (self.rid, p) in where}
        return found or None

    def add(self, view: _View, module: str, part: str, source: Source, rows: dict[int, tuple[int, int]],
            keep: list[int]) -> str | None:
        """Add this side's entry of the point (rows ``keep``); the name of its own first module, or None."""
        by_step: dict[int, list[int]] = {}
        for i in keep:
            step, row = rows[i]
            by_step.setdefault(step, []).append(row)
        parts: list[tuple[list[Entry], list[int]]] = []
        for step, step_rows in by_step.items():
            own_entries = self.side.refs_at(step, source)
            if own_entries is None:
                return None
            parts.append((own_entries, step_rows))
        if not parts:
            return None
        first = parts[0][0]
        tail = _own_shape(first, source)[2 if self.index is None else 1:]
        view.add(self.unit.request, self.unit.step, module, part, source, parts,
                 self.unit.batch if self.index is None else None, [len(keep), *tail], first[0].dtype)
        return first[0].module


def _pair_point(unit: _Unit, module: str, part: str, located: tuple[_Locator, _Locator],
                views: tuple[_View, _View], own: dict[str, tuple[str | None, str | None]]) -> None:
    sources = [loc.side.sources.get((module, part)) for loc in located]
    found = [loc.rows(src) if src is not None else None for loc, src in zip(located, sources, strict=True)]
    common = sorted(found[0].keys() & found[1].keys()) if found[0] and found[1] else []
    names: list[str | None] = [None, None]
    for n, (loc, src, rows) in enumerate(zip(located, sources, found, strict=True)):
        if src is None or not rows:
            continue
        names[n] = loc.add(views[n], module, part, src, rows, common or sorted(rows))  # both, else one-sided
    for n, name in enumerate(names):
        if name is not None:
            held = list(own.get(module, (None, None)))
            if held[n] is None:
                held[n] = name
                own[module] = (held[0], held[1])


def merge_request_culprits(culprits: Sequence[Culprit], own_names: dict[str, tuple[str | None, str | None]]
                           ) -> list[Culprit]:
    """One culprit per module across requests (the first in causal order), named as each engine names it."""
    merged: dict[tuple[str, int, bool], Culprit] = {}
    for c in culprits:
        key = (c.module, c.call, c.confirmed)
        first = merged.get(key)
        if first is None:
            c.golden_module, c.target_module = own_names.get(c.module, (None, None))
            c.requests = [c.rank]
            merged[key] = c
        elif first.requests is not None and c.rank not in first.requests:
            first.requests.append(c.rank)
        if first is not None and c.ranks:
            first.ranks = sorted(set(first.ranks or ()) | set(c.ranks))
    return list(merged.values())


def request_summaries(requests: Sequence[dict[str, Any]], entries: Sequence[EntryResult], tokens: Tokens,
                      culprits: Sequence[Culprit]) -> list[dict[str, Any]]:
    """Per request: compared points, verdict, first failing point, first token flip, culprit, and the largest
    difference in the log-probability of the tokens the golden went on with."""
    out = []
    for info in requests:
        request = int(info["request"])
        mine = [e for e in entries if e.rank == request]
        failing = [e for e in mine if e.status in FAILING]
        first = min(failing, key=lambda e: (e.step, e.index)) if failing else None
        steps = [s for s in tokens.steps if s.rank == request]
        flip = next((s for s in steps if s.flip), None)
        culprit = next((c for c in culprits if c.confirmed and c.requests and request in c.requests), None)
        points = sum(1 for e in mine if e.status in MEASURED)
        verdict = (DIVERGED if failing or culprit or (flip is not None and not flip.near_tie)
                   else MATCH if points else INCOMPLETE)
        out.append({**info, "verdict": verdict, "points": points,
                    "failing": len(failing),
                    "first_divergence": None if first is None else {"step": first.step, "name": first.name,
                                                                    "reason": first.reason},
                    "first_flip": None if flip is None else {"step": flip.step, "golden_token": flip.golden_token,
                                                             "target_token": flip.target_token,
                                                             "near_tie": flip.near_tie},
                    "culprit": None if culprit is None else (culprit.target_module or culprit.module) + (
                        f" on rank {', '.join(map(str, culprit.ranks))}" if culprit.ranks else ""),
                    "max_logprob_diff": max((e.metrics.get("logprob_diff_max") or 0.0 for e in mine
                                             if e.logits and isinstance(e.metrics.get("logprob_diff_max"), float)),
                                            default=None)})
    return out
