"""The comparison engine: align two dumps, compare pairs in parallel, localize, decide.

Tensors are streamed pair by pair from memory-mapped safetensors shards by a small thread pool
(PyTorch releases the GIL in its kernels), with a bounded number of pairs in flight, so peak memory
stays near a few of the largest tensor pairs whatever the size of the dumps.
"""

from __future__ import annotations

import importlib.util
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from llmdiff.compare.align import EntryPair, Mapping, align, squeezed_shape
from llmdiff.compare.crossengine import CrossEngine, cross_engine_views, merge_request_culprits, request_summaries
from llmdiff.compare.localize import analyze_tokens, find_culprits, first_divergence
from llmdiff.compare.metrics import TENSOR_METRICS, PairStats
from llmdiff.compare.results import (
    DIVERGED,
    FAIL,
    FAILING,
    INCOMPLETE,
    MATCH,
    MEASURED,
    MISSING,
    MISSING_IN_GOLDEN,
    MISSING_IN_TARGET,
    NOT_COMPARABLE,
    PASS,
    SHAPE_MISMATCH,
    TOKENS_DIFFER,
    Comparison,
    EntryResult,
)
from llmdiff.compare.tolerance import KL_BUDGET, KL_WORST_POSITION, REL_L2_BUDGET, Tolerance, lower_precision
from llmdiff.compare.unshard import across_ranks, culprit_ranks, rank_blame, unshard
from llmdiff.config import ModulePattern, StepSet
from llmdiff.errors import LlmdiffError, UsageError
from llmdiff.store.reader import DATA_MISSING, Dump
from llmdiff.store.schema import Entry, stats_unknown

if TYPE_CHECKING:
    import torch

Shards = tuple[tuple[int, int, int], ...] | None  # Entry.shards: (rank, first column, end)

#: A user metric: ``func(golden, target) -> float`` or ``-> (float, message)`` (msIT's signature).
Algorithm = Callable[["torch.Tensor", "torch.Tensor"], Any]
Progress = Callable[[int, int], None]

#: The metrics reports show by default (``--metric`` picks others; every metric is in JSON and CSV).
DEFAULT_COLUMNS = ("cosine", "rel_l2", "sqnr_db", "max_abs", "max_rel", "mismatches")

_LOGITS_MODULE = re.compile(r"(^|\.)(lm_head|logits|logits_processor)$")


@dataclass
class Options:
    """Everything that changes how two dumps are compared (the CLI flags, one to one)."""

    tolerance: Tolerance = field(default_factory=Tolerance)
    steps: StepSet | None = None
    modules: tuple[ModulePattern, ...] = ()
    mapping: Mapping | None = None
    metrics: tuple[str, ...] = ()
    algorithms: dict[str, Algorithm] = field(default_factory=dict)
    allow_missing: bool = False
    level: str = "layer"
    workers: int | None = None
    progress: Progress | None = None
    #: override the detected engine of each side (``hf``, ``vllm``); different engines pair canonical points
    engines: tuple[str | None, str | None] = (None, None)
    #: the ``FILE.py:FUNCTION`` specs ``algorithms`` were loaded from (workers elsewhere load them again)
    algorithm_specs: tuple[str, ...] = ()


LEVELS = ("layer", "token")


def load_algorithm(spec: str) -> tuple[str, Algorithm]:
    """Load ``file.py:func`` (the user's own code, never a dump's)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"--algorithm: expected FILE.py:FUNCTION, got {spec!r}")
    if not Path(path).is_file():
        raise UsageError(f"--algorithm: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"llmdiff_user_metric_{Path(path).stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"--algorithm: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"--algorithm: importing {path} failed: {type(exc).__name__}: {exc}") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise UsageError(f"--algorithm: {path} has no function {name!r}")
    return name, func


def is_logits(entry: Entry) -> bool:
    return (entry.part == "output" and len(entry.shape) >= 1 and entry.shape[-1] > 1
            and (entry.path.split(".")[-1] in ("logits", "next_token_logits")
                 or bool(_LOGITS_MODULE.search(entry.module))))


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


@dataclass
class _Deferred:
    """A loaded small pair waiting to be measured with others."""

    result: EntryResult
    golden: torch.Tensor
    target: torch.Tensor
    rtol: float
    atol: float
    dtype: str
    shards: Shards = None


@dataclass
class _Chunk:
    """What one call of :meth:`_Comparer.results` leaves for its end: small pairs to measure together,
    and results that copy the measurement of an earlier pair of the same stored tensors."""

    deferred: list[_Deferred] = field(default_factory=list)
    copies: list[tuple[EntryResult, EntryResult]] = field(default_factory=list)
    pending: dict[tuple[Any, ...], EntryResult] = field(default_factory=dict)  # measured at the chunk's end


def run_dtype(golden: Dump, target: Dump) -> str:
    """The lower precision of the two runs. Engines upcast logits to float32 at the end of a bfloat16
    model: the logits' budget is the run's precision, not their own dtype's."""
    return lower_precision(*{e.dtype for d in (golden, target) for e in d.entries})


class _Comparer:
    def __init__(self, golden: Dump, target: Dump, options: Options) -> None:
        self.golden, self.target, self.options = golden, target, options
        self.run_dtype = run_dtype(golden, target)
        self._measured: dict[tuple[Any, ...], EntryResult] = {}  # by the stored tensors measured

    @cached_property
    def kernels(self) -> ModuleType:
        """:mod:`llmdiff.compare.kernels`, imported with the first pair of tensors (it imports torch; comparing
        statistics needs none of it). Held here: importing names at each pair cost 1.3 µs a pair."""
        from llmdiff.compare import kernels

        return kernels

    def results(self, indices: range, pairs: Sequence[EntryPair],
                tokens_differ: set[tuple[int, int]]) -> list[EntryResult]:
        """Results of ``pairs[i]`` for ``i`` in ``indices``; small float pairs are measured together."""
        chunk = _Chunk()
        out = [self.result(i, pairs[i], tokens_differ, chunk) for i in indices]
        if chunk.deferred:
            batch = self.kernels.pair_stats_batch([(d.golden, d.target, d.rtol, d.atol) for d in chunk.deferred])
            for d, stats in zip(chunk.deferred, batch, strict=True):
                self._judge_tensors(d.result, d.golden, d.target, d.dtype, stats, d.shards)
        for result, source in chunk.copies:
            _copy_measurement(result, source)
        self._measured.update(chunk.pending)  # complete now, for the chunks that follow
        return out

    def result(self, index: int, pair: EntryPair, tokens_differ: set[tuple[int, int]],
               chunk: _Chunk) -> EntryResult:
        """The result of one pair; a small float pair is only loaded and left in ``deferred``, to be
        measured with others (see :meth:`results`)."""
        g, t = pair.golden, pair.target
        any_entry = pair.any
        result = EntryResult(index=index, rank=any_entry.rank, step=any_entry.step, module=any_entry.module,
                             call=any_entry.call, part=any_entry.part, path=any_entry.path, name=any_entry.name,
                             type=any_entry.type, status=PASS,
                             golden_dtype=g.dtype if g else None, target_dtype=t.dtype if t else None,
                             golden_shape=g.shape if g else None, target_shape=t.shape if t else None,
                             seq=(g.seq if g else -1, t.seq if t else -1),
                             golden_source=g.source if g else None, target_source=t.source if t else None)
        if g is None or t is None:
            result.status = MISSING_IN_GOLDEN if g is None else MISSING_IN_TARGET
            result.reason = "only in the " + ("target" if g is None else "golden")
            result.kind = "none"
            return result
        result.logits = is_logits(g)
        dtype = lower_precision(g.dtype, t.dtype, *((self.run_dtype,) if result.logits else ()))
        result.budget = REL_L2_BUDGET[dtype]
        if g.shape != t.shape and squeezed_shape(g.shape) != squeezed_shape(t.shape):
            result.status, result.kind = SHAPE_MISMATCH, "none"
            result.reason = f"shape {g.shape} vs {t.shape}"
            return result
        if g.data is not None and t.data is not None:
            # A dump stores a tensor once however many entries saw it (a layer's output is the next layer's
            # input): a pair of the same stored tensors is measured once.
            key = (g.process, g.data["file"], g.data["key"], t.process, t.data["file"], t.data["key"], dtype,
                   result.logits)
            shared = (result.rank, result.step) not in tokens_differ  # a copied status must be pass or fail
            source = (self._measured.get(key) or chunk.pending.get(key)) if shared else None
            if source is not None:
                chunk.copies.append((result, source))
            else:
                self._compare_tensors(result, g, t, dtype, chunk.deferred)
                if shared:  # a deferred pair is measured at the chunk's end
                    deferred = bool(chunk.deferred) and chunk.deferred[-1].result is result
                    (chunk.pending if deferred else self._measured)[key] = result
        elif stats_unknown(g.stats) or stats_unknown(t.stats):  # NaN/Inf that could not be counted: no verdict
            result.status, result.kind = NOT_COMPARABLE, "none"
            result.reason = (g.note if stats_unknown(g.stats) else t.note) or "statistics unknown"
            return result
        elif (g.stats or g.data) and (t.stats or t.data):  # statistics on one side at least
            self._compare_stats(result, g.stats or _tensor_stats(self.golden, g),
                                t.stats or _tensor_stats(self.target, t), dtype)
        else:
            result.status, result.kind = NOT_COMPARABLE, "none"
            result.reason = g.note or t.note or "no data or statistics on one side"
            return result
        if (result.rank, result.step) in tokens_differ:
            result.status = TOKENS_DIFFER
            result.reason = "the two runs were fed different tokens at this step"
            result.rank_errors = result.ranks = None  # a failure only: this step's inputs differ
        return result

    def _compare_tensors(self, result: EntryResult, g: Entry, t: Entry, dtype: str,
                         deferred: list[_Deferred]) -> None:
        golden = self.golden.load(g)
        target = self.target.load(t)
        if golden.shape != target.shape:
            target = target.reshape(golden.shape)
        if not (_is_float(g.dtype) and _is_float(t.dtype)):
            import torch  # here, not at the top: comparing statistics needs no tensor arithmetic

            different = int((golden.to(torch.float64) != target.to(torch.float64)).sum())
            result.metrics = {"mismatches": different}
            result.error = 0.0 if different == 0 else float("inf")
            if different:
                result.status, result.reason = FAIL, f"{different} of {golden.numel()} values differ"
            return
        rtol, atol = self.options.tolerance.allclose_tolerances(dtype)
        shards = (t.shards or g.shards) if g.shape == t.shape else None
        if golden.numel() <= self.kernels.BATCH_MAX and not result.logits and not self.options.algorithms:
            deferred.append(_Deferred(result, golden, target, rtol, atol, dtype, shards))
            return
        self._judge_tensors(result, golden, target, dtype, self.kernels.pair_stats(golden, target, rtol, atol), shards)

    def _judge_tensors(self, result: EntryResult, golden: torch.Tensor, target: torch.Tensor, dtype: str,
                       stats: PairStats, shards: Shards = None) -> None:
        """Metrics and status of a float pair; a failing pair reassembled from TP shards also gets its
        ranks' errors (see :func:`~llmdiff.compare.unshard.rank_blame`), while its tensors are at hand."""
        metrics: dict[str, Any] = {name: fn(stats) for name, fn in TENSOR_METRICS.items()}
        metrics["mismatches"] = stats.mismatches
        metrics["nonfinite_mismatch"] = stats.nonfinite_mismatch
        if result.logits:
            metrics.update(self.kernels.logits_metrics(golden, target))
        for name, func in self.options.algorithms.items():
            metrics[name] = _run_algorithm(name, func, golden, target)
        result.metrics = metrics
        result.error = metrics["worst_row_rel_l2"]
        tolerance = self.options.tolerance
        if result.logits and not (tolerance.thresholds or tolerance.allclose):
            # Softmax ignores a constant shift of the logits, so rel_l2 and cosine of raw logits overstate
            # differences that change nothing: logits are judged by their distributions (KL) instead.
            ok, reason = not metrics["nonfinite_mismatch"], f"{metrics['nonfinite_mismatch']} NaN/Inf mismatches"
            budget = tolerance.kl_budget(dtype)
            min_cosine = tolerance.logits_min_cosine
            if ok and min_cosine is not None and not metrics["cosine"] > min_cosine:
                ok, reason = False, (f"logits cosine {metrics['cosine']:.6f} <= {min_cosine:g} "
                                     f"({tolerance.preset} preset)")
            if ok and not metrics["kl"] <= budget:
                ok, reason = False, f"logits KL {metrics['kl']:.3g} > {budget:g} ({dtype} budget)"
            if ok and not metrics["kl_max"] <= KL_WORST_POSITION * budget:
                ok, reason = False, (f"logits KL {metrics['kl_max']:.3g} at one position > {KL_WORST_POSITION} x "
                                     f"{budget:g} ({dtype} budget)")
        else:
            ok, reason = tolerance.judge(metrics, dtype)
        if not ok and result.status == PASS:  # a step fed different tokens keeps that status
            result.status, result.reason = FAIL, reason
            if shards:
                result.rank_errors, result.ranks = rank_blame(golden, target, shards, result.budget or 0.0)

    def _compare_stats(self, result: EntryResult, gs: dict[str, Any], ts: dict[str, Any], dtype: str) -> None:
        result.kind = "stats"

        def rel(name: str) -> float | None:
            a, b = gs.get(name), ts.get(name)
            if a is None or b is None:
                return None
            return abs(b - a) / abs(a) if a else (0.0 if b == a else float("inf"))

        metrics: dict[str, Any] = {"norm_rel": rel("norm"), "std_rel": rel("std")}
        for name in ("min", "max", "mean"):
            a, b = gs.get(name), ts.get(name)
            metrics[f"{name}_diff"] = None if a is None or b is None else abs(b - a)
        metrics["nonfinite_mismatch"] = abs((ts.get("nan") or 0) - (gs.get("nan") or 0)) + abs(
            (ts.get("inf") or 0) - (gs.get("inf") or 0))
        if "hash" in gs and "hash" in ts:
            metrics["hash_equal"] = int(gs["hash"] == ts["hash"])
        result.metrics = metrics
        result.error = metrics["norm_rel"]
        ok, reason = self.options.tolerance.judge(metrics, dtype)
        if not ok:
            result.status, result.reason = FAIL, reason


def _tensor_stats(dump: Dump, entry: Entry) -> dict[str, Any]:
    """The statistics a capture would have recorded of a stored tensor (to compare it with a side that holds
    statistics only)."""
    from llmdiff.capture.stats import tensor_stats  # imports torch: only for a tensor, not for two statistics

    return tensor_stats(dump.load(entry))


def _copy_measurement(result: EntryResult, source: EntryResult) -> None:
    result.metrics, result.error, result.kind = dict(source.metrics), source.error, source.kind
    result.status, result.reason = source.status, source.reason
    result.rank_errors, result.ranks = source.rank_errors, source.ranks


def _run_algorithm(name: str, func: Algorithm, golden: torch.Tensor, target: torch.Tensor) -> float | None:
    try:
        value = func(golden, target)
    except Exception as exc:
        raise LlmdiffError(f"--algorithm {name} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(value, tuple):
        value = value[0]
    return None if value is None else float(value)


def _step_token_ids(dump: Dump, mapping_steps: StepSet | None) -> dict[tuple[int, int], Any]:
    return {(s.rank, s.step): s.token_ids for s in dump.steps
            if s.token_ids is not None and (mapping_steps is None or s.step in mapping_steps)}


def _steps_after_token_mismatch(golden_ids: dict[tuple[int, int], Any],
                                target_ids: dict[tuple[int, int], Any]) -> set[tuple[int, int]]:
    """Steps fed different tokens, and every later step of that rank: their context (KV cache) differs."""
    first: dict[int, int] = {}
    for rank, step in sorted(golden_ids.keys() & target_ids.keys()):
        if golden_ids[(rank, step)] != target_ids[(rank, step)]:
            first.setdefault(rank, step)
    return {(rank, step) for rank, step in golden_ids.keys() | target_ids.keys()
            if rank in first and step >= first[rank]}


def _in_order(pool: ThreadPoolExecutor, indices: range, work: Callable[[range], list[EntryResult]],
              limit: int, chunk: int = 256) -> Iterable[EntryResult]:
    """Run ``work`` over ``indices`` in chunks (small tensors are measured together, and cost less than a
    task hand-off), with at most ``limit`` chunks pending, yielding results in order."""

    def run_chunk(start: int) -> list[EntryResult]:
        return work(range(start, min(start + chunk, indices.stop)))

    pending: deque[Future[list[EntryResult]]] = deque()
    for start in range(indices.start, indices.stop, chunk):
        pending.append(pool.submit(run_chunk, start))
        if len(pending) >= limit:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def _default_workers(entries: Sequence[Entry]) -> int:
    """One: the reductions of a large pair already run on torch's intra-op threads (a second pool of
    threads measured 1.6x slower on 2 cores), and the many small pairs of decode steps are Python-bound."""
    return 1


@dataclass
class Plan:
    """What a comparison measures, fixed before any tensor is read: the dumps as compared (views of
    tensor-parallel or cross-engine dumps), the aligned pairs and the steps fed different tokens.
    The same dumps and options always give the same plan, so workers elsewhere can rebuild it."""

    golden: Dump
    target: Dump
    options: Options
    pairs: list[EntryPair]
    golden_ids: dict[tuple[int, int], Any]
    target_ids: dict[tuple[int, int], Any]
    tokens_differ: set[tuple[int, int]]
    bases: tuple[Dump, Dump]
    cross: CrossEngine | None = None
    #: the dumps the cross-engine views were made of (tensor-parallel ones already unsharded)
    viewed: tuple[Dump, ...] = ()
    notes: list[str] = field(default_factory=list)
    ranks_agree: dict[str, dict[str, Any]] = field(default_factory=dict)


def plan(golden: Dump, target: Dump, options: Options, check_ranks: bool = True) -> Plan:
    """Views, alignment and token bookkeeping of a comparison (no tensor is read, except by the check that
    a tensor-parallel side's ranks agree, ``check_ranks``)."""
    bases = (golden, target)
    notes: list[str] = []
    agree: dict[str, dict[str, Any]] = {}
    sides = []
    for label, dump in (("golden", golden), ("target", target)):
        unsharded = unshard(dump)
        if unsharded is not None:
            notes += unsharded.notes
            if check_ranks:
                agree[label] = ranks_agree(dump, options)
            dump = unsharded.dump
        sides.append(dump)
    golden, target = sides
    viewed = (golden, target)
    cross = cross_engine_views(golden, target, options.engines)
    if cross is not None:
        golden, target = cross.golden, cross.target
    pairs = align(golden.entries, target.entries, options.mapping, options.steps, options.modules)
    if options.level == "token":  # msIT's -cl token: the logits of each token only
        pairs = [p for p in pairs if is_logits(p.any)]
    golden_ids, target_ids = _step_token_ids(golden, options.steps), _step_token_ids(target, options.steps)
    return Plan(golden, target, options, pairs, golden_ids, target_ids,
                _steps_after_token_mismatch(golden_ids, target_ids), bases, cross, viewed, notes, agree)


def measure(p: Plan, indices: range | None = None) -> list[EntryResult]:
    """The results of the plan's pairs (``indices`` of them, all by default), in order."""
    options = p.options
    indices = range(len(p.pairs)) if indices is None else indices
    workers = options.workers or _default_workers(p.golden.entries)
    comparer = _Comparer(p.golden, p.target, options)
    entries: list[EntryResult] = []
    work = partial(comparer.results, pairs=p.pairs, tokens_differ=p.tokens_differ)
    if workers == 1:
        # In the calling thread, in big chunks (small pairs are measured in big batches). Not in a pool's
        # thread: glibc gives each thread its own heap, and a worker's kept the freed blocks of the logits
        # (a 1.2 GB prefill compare peaked at 0.92 GB RSS in a worker thread, 0.4 GB here).
        for start in range(indices.start, indices.stop, 1024):
            entries.extend(work(range(start, min(start + 1024, indices.stop))))
            if options.progress:
                options.progress(len(entries), len(indices))
        return entries
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmdiff-compare") as pool:
        # Small chunks, to spread the large tensors that made several workers worth having.
        for result in _in_order(pool, indices, work, 2 * workers, chunk=32):
            entries.append(result)
            if options.progress:
                options.progress(len(entries), len(indices))
    return entries


def close(p: Plan) -> None:
    for dump in {id(d): d for d in (p.golden, p.target, *p.bases)}.values():
        dump.close()


def _measure_and_close(p: Plan) -> list[EntryResult]:
    try:
        return measure(p)
    finally:
        close(p)


def compare_dumps(golden: Dump, target: Dump, options: Options | None = None) -> Comparison:
    """Compare two opened dumps. See :func:`llmdiff.compare` for the options."""
    options = options or Options()
    p = plan(golden, target, options)
    return conclude(p, _measure_and_close(p))


def ranks_agree(dump: Dump, options: Options) -> dict[str, Any]:
    """Whether a tensor-parallel dump's ranks hold the same values in the tensors every rank holds whole
    (see :func:`rank_summary`)."""
    return rank_summary(compare_ranks(dump, options))


def rank_summary(comparison: Comparison) -> dict[str, Any]:
    """An across-ranks comparison in short: verdict, compared entries, the first departure and its culprit."""
    culprit = next((c for c in comparison.culprits if c.confirmed), None)
    return {"verdict": comparison.verdict, "compared": comparison.counts["total"],
            "first_divergence": comparison.first_divergence, "culprit": None if culprit is None else
            {"module": culprit.module, "rank": culprit.rank, "step": culprit.step}}


def ranks_plan(dump: Dump, options: Options) -> Plan:
    """The plan of an across-ranks comparison of ``dump`` (see :func:`compare_ranks`)."""
    views = across_ranks(dump)
    if views is None:
        raise UsageError(f"--across-ranks: {dump.path} is not a tensor-parallel dump (no process records a "
                         "TP size above 1)")
    solo = replace(options, mapping=None, engines=(None, None), progress=None)
    return plan(*views, solo, check_ranks=False)


def conclude_ranks(p: Plan, entries: list[EntryResult]) -> Comparison:
    """:func:`conclude` for an across-ranks plan: each culprit names its rank."""
    comparison = conclude(p, entries)
    for culprit in comparison.culprits:
        culprit.ranks = [culprit.rank]
    comparison.settings["across_ranks"] = True
    return comparison


def compare_ranks(dump: Dump, options: Options | None = None) -> Comparison:
    """Every replicated tensor of each rank ``r > 0`` against rank 0's (``llmdiff compare --across-ranks``):
    a rank that departs is localized like any divergence; its results carry its rank."""
    p = ranks_plan(dump, options or Options())
    return conclude_ranks(p, _measure_and_close(p))


def conclude(p: Plan, entries: list[EntryResult]) -> Comparison:
    """Localization, verdict and notes over the measured ``entries`` of plan ``p``."""
    options, golden, target, cross = p.options, p.golden, p.target, p.cross
    lost = [x for pr in p.pairs for x in (pr.golden, pr.target) if x is not None and x.note == DATA_MISSING]
    if cross is not None:  # a canonical point needs its own entries' data: count those lost behind the views
        lost += [e for d in p.viewed for e in d.entries if e.note == DATA_MISSING]
    token_thresholds = dict(options.tolerance.thresholds)
    if options.tolerance.logits_min_cosine is not None:
        token_thresholds.setdefault("cosine", options.tolerance.logits_min_cosine)
    tokens = analyze_tokens(entries, p.golden_ids, p.target_ids, token_thresholds, options.tolerance.kl_budget,
                            run_dtype(golden, target))
    culprits, had_inputs = find_culprits(entries)
    culprit_ranks(culprits, entries)
    first = first_divergence(entries, culprits)
    notes: list[str] = []
    missing = [e for e in entries if e.status in MISSING]
    # Two tools capture different things (msIT saves no keyword inputs, msProbe adds parameters...):
    # across formats, entries on one side only are listed but are not a gap in the evidence.
    cross_tool = golden.format != target.format or cross is not None
    allow_missing = options.allow_missing or cross_tool
    flip = tokens.first_flip
    departure = flip is not None and flip.get("near_tie") is not True
    paired = len(entries) - len(missing)
    measured = sum(1 for e in entries if e.status in MEASURED)
    # a rank's evidence is missing (a side whose ranks share no whole tensor in the selection is not)
    unchecked = any(a["verdict"] == INCOMPLETE and a["compared"] for a in p.ranks_agree.values())
    if (missing and (not allow_missing or paired == 0)) or ((lost or unchecked) and not options.allow_missing):
        verdict = INCOMPLETE
    elif (first is not None or departure or tokens.first_input_mismatch == 0 or any(c.confirmed for c in culprits)
          or any(a["verdict"] == DIVERGED for a in p.ranks_agree.values())):
        verdict = DIVERGED
    elif measured == 0:  # no evidence is not a match
        verdict = INCOMPLETE
        notes.append(nothing_compared(p, entries))
    else:
        verdict = MATCH
    if missing and paired == 0:
        notes.append(nothing_compared(p, entries))
    elif missing and cross is not None:
        notes.append(f"{len(missing)} canonical points are present on one side only (one engine fuses or skips "
                     "them, or they were not captured): listed, they do not decide the verdict")
    elif missing and cross_tool:
        notes.append(f"{len(missing)} entries are present on one side only: the golden ({golden.format}) and the "
                     f"target ({target.format}) capture different things, so they do not decide the verdict")
    elif missing:
        notes.append(f"{len(missing)} entries are present on one side only"
                     + ("" if options.allow_missing else " (verdict 'incomplete'; narrow with --modules/--steps "
                        "or pass --allow-missing)"))
    if lost:
        names = ", ".join(sorted({e.name for e in lost})[:3])
        notes.append(f"{len(lost)} entries lost their tensor data (a shard is missing or damaged) and were compared "
                     f"by statistics only: {names}{', ...' if len(lost) > 3 else ''}"
                     + ("" if options.allow_missing else "; the verdict is incomplete (--allow-missing accepts it)"))
    if flip is not None and flip.get("near_tie"):
        notes.append(f"the greedy token flips at step {flip['step']} at a near-tie (golden margin "
                     f"{flip['golden_margin']:.3g} <= 2 x logit error {flip['logit_error']:.3g}): "
                     "consistent with precision noise")
    if any(e.status == TOKENS_DIFFER for e in entries):
        notes.append("steps fed different tokens are marked tokens_differ and do not decide the verdict")
    if any(e.kind == "stats" for e in entries):
        notes.append("some entries hold statistics only: they are compared by norm, mean, min/max and NaN/Inf "
                     "counts; element-wise metrics need mode='tensor'")
    if not had_inputs and any(e.status in FAILING for e in entries):
        notes.append("module inputs were not captured, so culprits cannot be told from victims: capture with "
                     "parts='both'")
    for side, agree in p.ranks_agree.items():
        where = agree["first_divergence"]
        if not agree["compared"]:
            notes.append(f"{side}: its tensor-parallel ranks hold no tensor whole in the compared selection, so "
                         "whether they agree was not checked")
        elif agree["verdict"] != MATCH:
            state = "disagree" if agree["verdict"] == DIVERGED else "could not all be compared (incomplete)"
            notes.append(f"{side}: its tensor-parallel ranks {state} on tensors every rank holds whole"
                         + ("" if where is None else
                                          f": rank {where['rank']} departs from rank 0 first at step "
                                          f"{where['step']} {where['name']}"))
    notes[:0] = p.notes
    requests: list[dict[str, Any]] = []
    if cross is not None:
        notes[:0] = cross.notes
        culprits = merge_request_culprits(culprits, cross.own_names)
        requests = request_summaries(cross.requests, entries, tokens, culprits)
    metric_names = list(options.metrics) or list(DEFAULT_COLUMNS)
    metric_names += [name for name in options.algorithms if name not in metric_names]
    tol = options.tolerance
    settings = {"rtol": tol.rtol, "atol": tol.atol, "thresholds": dict(tol.thresholds),
                "steps": None if options.steps is None else str(options.steps),
                "modules": [str(m) for m in options.modules], "allow_missing": allow_missing,
                "preset": tol.preset, "level": options.level, "formats": [golden.format, target.format],
                "engines": list(cross.engines) if cross is not None else None,
                "rel_l2_budgets": REL_L2_BUDGET, "kl_budgets": KL_BUDGET}
    return Comparison(verdict=verdict, golden=str(golden.path), target=str(target.path), first_divergence=first,
                      culprits=culprits if verdict != INCOMPLETE or culprits else [], tokens=tokens,
                      entries=entries, settings=settings, notes=notes,
                      problems=[f"golden: {p}" for p in golden.problems] + [f"target: {p}" for p in target.problems],
                      metric_names=metric_names, requests=requests, ranks_agree=p.ranks_agree)


def nothing_compared(p: Plan, entries: Sequence[EntryResult]) -> str:
    """Why a comparison measured no entry, in one note."""
    options = p.options
    filters = [flag for flag, used in (("--modules", bool(options.modules)), ("--steps", options.steps is not None))
               if used]
    if options.level == "token":
        filters.append("--level token")
    sizes = f"{len(p.golden.entries)} golden and {len(p.target.entries)} target entries"
    one_sided = bool(entries) and all(e.status in MISSING for e in entries)
    if filters and not entries:
        why = f"{' and '.join(filters)} selected none of the {sizes}"
    elif p.cross is not None and p.cross.statistics_only:
        why = ("a side holds statistics only, which cannot be split by request (capture full tensors, mode "
               "tensor, to pair runs that batched differently)")
    elif p.cross is not None and not entries:
        why = ("no captured entry holds a canonical point (operator-level entries pair only between runs of one "
               "engine that batched alike)")
    elif one_sided:
        why = "no entry of one dump pairs with an entry of the other (if the module names differ, map them with --map)"
    elif entries:
        why = "every pair was fed different tokens or could not be measured"
    else:
        why = f"no entry pairs ({sizes})"
    return f"nothing was compared: {why}; the verdict is incomplete, not match"


def options_from(rtol: float | None = None, atol: float | None = None, steps: str | None = None,
                 modules: Sequence[str] | str | None = None, thresholds: dict[str, float] | None = None,
                 mapping: Mapping | str | Path | None = None, metrics: Sequence[str] = (),
                 algorithms: Sequence[str] = (), allow_missing: bool = False, workers: int | None = None,
                 progress: Progress | None = None, preset: str | None = None, level: str = "layer",
                 engines: tuple[str | None, str | None] = (None, None)) -> Options:
    """Validate user-facing options into :class:`Options`."""
    from llmdiff.compare.align import load_mapping
    from llmdiff.config import parse_modules, parse_steps

    if isinstance(modules, str):
        modules = [m for m in modules.split(",") if m]
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:
            raise UsageError(f"--{name}: expected a non-negative number, got {value}")
    if level not in LEVELS:
        raise UsageError(f"--compare-level: {level!r} is not one of {', '.join(LEVELS)}")
    known = set(TENSOR_METRICS) | {"mismatches", "kl", "kl_max", "top1_agree", "golden_margin", "norm_rel"}
    loaded = dict(load_algorithm(spec) for spec in algorithms)
    unknown = [m for m in metrics if m not in known and m not in loaded]
    if unknown:
        raise UsageError(f"--metric: unknown metric(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Options(
        tolerance=Tolerance(rtol=rtol, atol=atol, thresholds=thresholds or {}, preset=preset),
        steps=None if steps is None else parse_steps(steps, "--steps"),
        modules=parse_modules(list(modules or []), "--modules"),
        mapping=load_mapping(mapping) if isinstance(mapping, (str, Path)) else mapping,
        metrics=tuple(metrics),
        algorithms=loaded,
        algorithm_specs=tuple(algorithms),
        allow_missing=allow_missing,
        level=level,
        workers=workers,
        progress=progress,
        engines=_engines(engines),
    )


def _engines(engines: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    from llmdiff.compare.crossengine import ENGINES

    for side, name in zip(("--golden-engine", "--target-engine"), engines, strict=True):
        if name not in (None, "auto", *ENGINES):
            raise UsageError(f"{side}: {name!r} is not one of auto, {', '.join(ENGINES)}")
    return (None if engines[0] == "auto" else engines[0], None if engines[1] == "auto" else engines[1])
