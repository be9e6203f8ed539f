"""Localization: the first diverging token, the first failing entry, and the modules that introduced error.

Culprits
--------
For every module call with compared inputs and outputs:

* ``input_error``  = the largest error among its floating-point inputs (integer inputs such as token
  ids are exact, so an embedding starts from zero). The error of a tensor is the relative L2 error
  of its worst row (token position): a fault that hits one position, such as an overflow on the
  attention-sink token, is not diluted by the healthy others;
* ``output_error`` = the largest among its outputs;
* ``introduced``   = ``sqrt(max(output_error² - input_error², 0))``: the part of the output error the
  carried input error does not account for, new error being independent of the carried one (true
  of rounding);
* ``ratio``        = ``introduced / max(input_error, u, f)``, with ``u`` the unit roundoff of the
  lower-precision dtype and ``f`` the float32 accumulation floor (``ACCUMULATION_FLOOR``): what the
  call adds, in units of what it was given (or of one rounding);
* ``expected``     = ``max(input_error, u, f) * max(1, median ratio of its peers)``, the peers being
  the same module in the other layers of the same step (``layers.#.mlp``). Ratios, not raw errors,
  are compared, so modules downstream of a fault, which amplify the large error they receive, do
  not raise the bar for the faulty one.

``score = introduced / expected``, and 0 at a step where the call's direct children, added in
quadrature, introduced at least half its error (they explain it: a parent is not blamed for a
child). Scores are then gathered per (rank, module, call) over the steps it ran in. It is a culprit

* at a *boundary*: inputs agree within tolerance, outputs do not, and ``score >= BOUNDARY``;
* when *consistent*: median score >= ``CONSISTENT`` over at least 3 steps — a real fault shows at
  every step, while healthy low-precision noise rarely spikes twice in the same place;
* on a *spike*: a single-step score >= ``SPIKE`` (or >= ``JUMP`` when fewer than 3 steps were
  captured, so no consistency can be seen).

Boundary and consistent culprits are *confirmed* (they make the verdict "diverged"); spikes, and
any culprit judged from statistics only (a norm is a weak stand-in for an error), are listed as
suspects only. Confirmed culprits are ranked in causal order (by step, then execution
order), as an error introduced early reaches later modules and steps through the residual stream
and the KV cache, whose contents hooks do not see as an input; suspects follow, by score. Each is
reported at the first step where it qualified.

The thresholds were set on healthy bf16-vs-fp32 runs of SmolLM2-135M: over 32 generated tokens the
highest per-module median score was 1.64; over 64, one MLP output that nearly cancels on one token
scored 11.2 at that single step (a spike, hence ``SPIKE`` well above it).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmdiff.compare.results import FAIL, FAILING, MISSING, PASS, Culprit, EntryResult, Tokens, TokenStep
from llmdiff.compare.tolerance import KL_BUDGET, lower_precision, unit_roundoff

#: The least error a call is expected to add, whatever the dtype: two kernels (two engines, two BLAS
#: builds) summing a float32 dot product in different orders differ by dozens of ulps. Measured on
#: SmolLM2, vLLM vs transformers in float32: exactly equal inputs give q/k/v projections 6-7 ulps apart.
ACCUMULATION_FLOOR = 64 * 2.0**-24
JUMP = 6.0
BOUNDARY = 2.0
SPIKE = 20.0
CONSISTENT = 2.5
CHILD_EXPLAINS = 0.5
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def role(module: str) -> str:
    """A module's role, the same in every layer: ``model.layers.3.mlp`` → ``model.layers.#.mlp``."""
    return _LAYER_INDEX.sub("#", module)


@dataclass
class ModuleCall:
    rank: int
    step: int
    module: str
    call: int
    first: int
    last: int
    inputs: list[EntryResult] = field(default_factory=list)
    outputs: list[EntryResult] = field(default_factory=list)
    input_error: float = 0.0
    output_error: float = 0.0
    introduced: float = 0.0
    expected: float = 0.0
    boundary: bool = False
    nonfinite: bool = False  # its inputs agree on being finite, its outputs do not: it made the NaN/Inf
    dtypes: list[str] = field(default_factory=list)

    def contains(self, other: ModuleCall) -> bool:
        # Submodules are "<module>.<child>", ops run by a module "<module>/<op>".
        prefixes = (self.module + ".", self.module + "/") if self.module else ("",)
        return (other is not self and other.module.startswith(prefixes) and other.module != self.module
                and self.first <= other.first and other.last <= self.last)


def _float(entry: EntryResult) -> bool:
    return entry.error is not None and (entry.golden_dtype or "").startswith(("float", "bfloat"))


def _nonfinite(entry: EntryResult) -> bool:
    """One side holds NaN/Inf where the other does not (or the error itself is not a number)."""
    mismatch = entry.metrics.get("nonfinite_mismatch")
    return bool(mismatch) or (entry.error is not None and not math.isfinite(entry.error))


def module_calls(entries: Sequence[EntryResult]) -> list[ModuleCall]:
    """Group compared entries into module calls that have both inputs and outputs."""
    calls: dict[tuple[int, int, str, int], ModuleCall] = {}
    # a call whose inputs were captured on one side only has an unknown input error, not a zero one
    unknown_inputs = {(e.rank, e.step, e.module, e.call) for e in entries if e.is_input and e.status in MISSING}
    for e in entries:
        if e.status not in (PASS, FAIL) or e.part in ("save", "param"):
            continue
        key = (e.rank, e.step, e.module, e.call)
        call = calls.get(key)
        if call is None:
            call = calls[key] = ModuleCall(e.rank, e.step, e.module, e.call, e.index, e.index)
        call.first, call.last = min(call.first, e.index), max(call.last, e.index)
        (call.inputs if e.is_input else call.outputs).append(e)
    result = []
    for key, call in calls.items():
        float_outputs = [e for e in call.outputs if _float(e)]
        if not float_outputs or (key in unknown_inputs and not any(_float(e) for e in call.inputs)):
            continue
        if any(_nonfinite(e) for e in float_outputs):
            # NaN/Inf break the error arithmetic; what matters is who turned finite inputs into them
            call.nonfinite = bool(call.inputs) and not any(_nonfinite(e) for e in call.inputs)
            call.boundary = call.nonfinite
            call.input_error = max((e.error or 0.0 for e in call.inputs if _float(e) and not _nonfinite(e)),
                                   default=0.0)
            call.output_error = call.introduced = math.inf
            call.dtypes = [d for e in float_outputs for d in (e.golden_dtype or "", e.target_dtype or "")]
            result.append(call)
            continue
        call.input_error = max((e.error or 0.0 for e in call.inputs if _float(e)), default=0.0)
        call.output_error = max(e.error or 0.0 for e in float_outputs)
        if not all(math.isfinite(x) for x in (call.input_error, call.output_error)):
            continue
        call.introduced = math.sqrt(max(call.output_error**2 - call.input_error**2, 0.0))
        # The precision a call is held to is its inputs' (else its outputs'): an op given float32 on both
        # sides that returns float16 on one has lost precision itself, and that loss is its error.
        float_inputs = [e for e in call.inputs if _float(e)]
        call.dtypes = [d for e in float_inputs or float_outputs for d in (e.golden_dtype or "", e.target_dtype or "")]
        inputs_ok = all(e.status == PASS for e in call.inputs)
        call.boundary = bool(call.inputs) and inputs_ok and any(e.status == FAIL for e in float_outputs)
        result.append(call)
    return result


def _direct_children(calls: Sequence[ModuleCall]) -> dict[int, list[ModuleCall]]:
    """For each call (by id), the calls directly inside it: nesting by module path and execution span."""
    children: dict[int, list[ModuleCall]] = {id(c): [] for c in calls}
    by_step: dict[tuple[int, int], list[ModuleCall]] = {}
    for c in calls:
        by_step.setdefault((c.rank, c.step), []).append(c)
    for group in by_step.values():
        stack: list[ModuleCall] = []
        for c in sorted(group, key=lambda c: (c.first, -c.last, c.module.count("."))):
            while stack and not stack[-1].contains(c):
                stack.pop()
            if stack:
                children[id(stack[-1])].append(c)
            stack.append(c)
    return children


def _step_scores(calls: Sequence[ModuleCall]) -> dict[int, float]:
    """Per call (by id): introduced / expected, or 0 where direct children explain the error."""
    ratios: dict[tuple[int, int, str], list[float]] = {}
    for c in calls:
        c.expected = max(c.input_error, unit_roundoff(*c.dtypes), ACCUMULATION_FLOOR)
        if math.isfinite(c.introduced):
            ratios.setdefault((c.rank, c.step, role(c.module)), []).append(c.introduced / c.expected)
    children = _direct_children(calls)
    scores = {}
    for c in calls:
        if c.nonfinite or not math.isfinite(c.introduced):
            # the first to make NaN/Inf out of finite inputs is the culprit, unless a child made them
            made_by_child = any(d.nonfinite for d in children[id(c)])
            scores[id(c)] = math.inf if c.nonfinite and not made_by_child else 0.0
            c.boundary = c.nonfinite and not made_by_child
            continue
        group = ratios.get((c.rank, c.step, role(c.module)), [])
        if len(group) >= 3:
            c.expected *= max(1.0, statistics.median(group))
        explained = math.sqrt(sum(d.introduced**2 for d in children[id(c)])) >= CHILD_EXPLAINS * c.introduced
        scores[id(c)] = 0.0 if explained or not c.introduced else c.introduced / c.expected
        c.boundary = c.boundary and scores[id(c)] >= BOUNDARY
    return scores


def find_culprits(entries: Sequence[EntryResult], limit: int = 10) -> tuple[list[Culprit], bool]:
    """Rank module calls by the error they introduced. Also says whether any call had inputs to judge by."""
    calls = module_calls(entries)
    scores = _step_scores(calls)
    series: dict[tuple[int, str, int], list[ModuleCall]] = {}
    for c in calls:
        series.setdefault((c.rank, c.module, c.call), []).append(c)
    found = []
    for steps in series.values():
        values = [scores[id(c)] for c in steps]
        median = statistics.median(values)
        spike = SPIKE if len(steps) >= 3 else JUMP
        boundaries = [c for c in steps if c.boundary]
        made_nonfinite = [c for c in boundaries if c.nonfinite]
        if made_nonfinite:
            kind, shown = 0, made_nonfinite[0]
            reason = "its inputs are finite on both sides, its output holds NaN/Inf on one side only"
        elif boundaries:
            kind, shown, reason = 0, boundaries[0], "inputs agree within tolerance, outputs do not"
        elif len(steps) >= 3 and median >= CONSISTENT:
            shown = next(c for c in steps if scores[id(c)] >= CONSISTENT)
            kind, reason = 1, f"adds {median:.1f}x the error its inputs, peers and dtype account for, at every step"
        elif max(values) >= spike:
            shown = next(c for c in steps if scores[id(c)] >= spike)
            kind, reason = 2, f"adds {scores[id(shown)]:.1f}x the error its inputs, peers and dtype account for"
        else:
            continue
        if kind < 2 and any(e.kind == "stats" for e in shown.outputs):
            # A norm is a weak stand-in for an error (differences can cancel): a suspect, never a verdict.
            kind, reason = 2, reason + " (statistics only: capture tensors to confirm)"
        found.append((kind, median, shown, scores[id(shown)], reason, sum(1 for v in values if v >= CONSISTENT)))
    # Confirmed culprits in causal order (step, then execution order): an error introduced early
    # reaches later modules and steps (through the residual stream and the KV cache), so the
    # earliest is the origin and later ones may be its victims. Suspects follow, by score.
    found.sort(key=lambda f: (f[0] == 2, f[2].step if f[0] < 2 else 0, f[2].first if f[0] < 2 else 0, -f[3]))
    culprits = [Culprit(rank=c.rank, step=c.step, module=c.module, call=c.call, score=round(score, 3),
                        input_error=c.input_error, output_error=c.output_error, introduced_error=c.introduced,
                        expected_error=c.expected, reason=reason, steps=max(count, 1), confirmed=kind < 2)
                for kind, _, c, score, reason, count in found[:limit]]
    return culprits, any(c.inputs for c in calls)


def first_divergence(entries: Sequence[EntryResult], culprits: Sequence[Culprit] = ()) -> dict[str, Any] | None:
    """The earliest failing entry in execution order (by step, then order within the step). When every
    tensor is within its budget but a culprit is confirmed (an error far above what its inputs, peers
    and dtype explain), the culprit's first output entry, with status ``culprit``."""
    failing = [e for e in entries if e.status in FAILING]
    if failing:
        e = min(failing, key=lambda x: (x.step, x.index))
        status, reason = e.status, e.reason
    else:
        culprit = next((c for c in culprits if c.confirmed), None)
        outputs = [] if culprit is None else [
            e for e in entries if (e.rank, e.step, e.module, e.call) == (culprit.rank, culprit.step, culprit.module,
                                                                         culprit.call) and not e.is_input]
        if culprit is None or not outputs:
            return None
        e = min(outputs, key=lambda x: x.index)
        status = "culprit"
        reason = f"within its budget, but {culprit.reason} (input error {culprit.input_error:.3g} -> output " \
                 f"error {culprit.output_error:.3g})"
    return {"rank": e.rank, "step": e.step, "module": e.module, "call": e.call, "part": e.part, "path": e.path,
            "name": e.name, "status": status, "reason": reason, "metrics": e.metrics,
            **({"ranks": e.ranks, "rank_errors": e.rank_errors} if e.ranks else {})}


def _pick_logits(entries: Sequence[EntryResult]) -> list[EntryResult]:
    logits = [e for e in entries if e.logits and e.metrics.get("kl") is not None]
    if not logits:
        return []
    # One logits tensor per step: prefer the model's own output (the root, "") over the lm_head module's.
    preferred = min({e.module for e in logits}, key=lambda m: (m != "", m))
    return [e for e in logits if e.module == preferred]


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def analyze_tokens(entries: Sequence[EntryResult], golden_ids: dict[tuple[int, int], Any],
                   target_ids: dict[tuple[int, int], Any], thresholds: dict[str, float],
                   kl_budget: Callable[[str], float] = KL_BUDGET.__getitem__, run_dtype: str = "float64") -> Tokens:
    """Per-step logits comparison, the first step out of budget and the first greedy-token flip.
    ``thresholds`` may set ``cosine`` and ``kl``; ``kl_budget(dtype)`` is the KL limit otherwise, for the
    lower precision of the logits' dtypes and ``run_dtype`` (the runs' lowest: logits are often upcast)."""
    tokens = Tokens()
    steps: dict[tuple[int, int], TokenStep] = {}
    parted: set[int] = set()  # ranks whose runs were fed different tokens: later steps differ in context too
    for key in sorted(set(golden_ids) & set(target_ids), key=lambda k: (k[1], k[0])):
        if golden_ids[key] != target_ids[key]:
            parted.add(key[0])
        steps[key] = TokenStep(rank=key[0], step=key[1], inputs_match=key[0] not in parted)
    logits = _pick_logits(entries)
    if logits:
        tokens.logits_entry = logits[0].name
        dtype = lower_precision(logits[0].golden_dtype or "", logits[0].target_dtype or "", run_dtype)
        cos_min = thresholds.get("cosine", 0.0)
        kl_max = thresholds.get("kl", kl_budget(dtype))
        tokens.budget = {"kl": kl_max, **({"cosine": cos_min} if "cosine" in thresholds else {})}
        for e in logits:
            m = e.metrics
            ts = steps.setdefault((e.rank, e.step), TokenStep(rank=e.rank, step=e.step))
            ts.golden_token, ts.target_token = _int(m.get("golden_token")), _int(m.get("target_token"))
            ts.cosine, ts.kl, ts.kl_max = m.get("cosine"), m.get("kl"), m.get("kl_max")
            ts.top1_agree, ts.golden_margin = m.get("top1_agree"), m.get("golden_margin")
            ts.logit_error = m.get("last_logit_err")
            nonfinite = bool(m.get("nonfinite_mismatch")) or not math.isfinite(float(ts.logit_error or 0.0))
            ts.within_budget = not nonfinite and (ts.cosine or 0.0) >= cos_min and (ts.kl or 0.0) <= kl_max
            ts.flip = ts.golden_token != ts.target_token
            if ts.flip:
                # A gap smaller than twice the largest logit error can be closed by that error alone.
                ts.near_tie = bool(ts.within_budget and (ts.golden_margin or 0.0) <= 2 * (ts.logit_error or 0.0))
    tokens.steps = [steps[k] for k in sorted(steps, key=lambda k: (k[1], k[0]))]
    for ts in tokens.steps:
        if tokens.first_input_mismatch is None and ts.inputs_match is False:
            tokens.first_input_mismatch = ts.step
        if tokens.first_out_of_budget is None and ts.within_budget is False and ts.inputs_match is not False:
            tokens.first_out_of_budget = ts.step
        if tokens.first_flip is None and ts.flip:
            tokens.first_flip = {"rank": ts.rank, "step": ts.step, "golden_token": ts.golden_token,
                                 "target_token": ts.target_token, "golden_margin": ts.golden_margin,
                                 "logit_error": ts.logit_error, "near_tie": ts.near_tie}
    if tokens.first_flip is None and tokens.first_input_mismatch:
        # No logits captured: the fed tokens tell where generation parted (one step earlier).
        step = tokens.first_input_mismatch - 1
        tokens.first_flip = {"rank": 0, "step": step, "golden_token": None, "target_token": None,
                             "golden_margin": None, "logit_error": None, "near_tie": None}
    return tokens
