"""``llmdiff.compare``: the one call behind ``llmdiff compare``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from llmdiff.compare.align import Mapping
from llmdiff.compare.engine import Options, Progress, compare_dumps, compare_ranks, options_from
from llmdiff.errors import UsageError
from llmdiff.gcpause import collector_paused
from llmdiff.report.model import Report
from llmdiff.store.reader import Dump, open_dump


def compare(golden: str | Path | Dump, target: str | Path | Dump | None = None, *, rtol: float | None = None,
            atol: float | None = None, steps: str | None = None, modules: Sequence[str] | str | None = None,
            thresholds: dict[str, float] | None = None, mapping: Mapping | str | Path | None = None,
            metrics: Sequence[str] = (), algorithms: Sequence[str] = (), allow_missing: bool = False,
            preset: str | None = None, level: str = "layer", workers: int | None = None,
            progress: Progress | None = None, engines: tuple[str | None, str | None] = (None, None),
            across_ranks: bool = False, ray: str | None = None) -> Report:
    """Compare two dumps and localize where the target departs from the golden.

    ``rtol``/``atol`` switch the pass test to an element-wise allclose; ``thresholds`` (e.g.
    ``{"cosine": 0.999}``) replace the dtype-aware default budget; ``steps`` (``"0-3"``) and
    ``modules`` (regexes, ``:i`` allowed) narrow the comparison; ``mapping`` renames module paths
    (a :class:`~llmdiff.compare.align.Mapping` or a YAML/JSON file); ``metrics`` picks the columns
    of reports; ``algorithms`` adds user metrics (``"file.py:func"``); ``allow_missing`` lets
    entries present on one side only not make the verdict ``"incomplete"`` (dumps of two different
    tools never do: they capture different things); ``preset="msit"`` judges logits by msIT's rule
    (cosine > 0.999, KL < 0.005 bf16 / 0.0001 fp16); ``level="token"`` compares only the logits of
    each token (msIT's ``-cl token``). Either side may be an llmdiff, msProbe, msIT, vLLM or SGLang dump.
    Captures of two different engines (transformers and vLLM, detected from the dumps, or given as
    ``engines=("hf", "vllm")``) are paired by canonical point and (request, position).

    A tensor-parallel dump (one folder per rank) is compared as the unsharded run it adds up to, and
    its ranks are checked to agree on what they all hold; a culprit in a reassembled tensor names the
    ranks whose shards carry the error. ``across_ranks=True`` compares the ranks of the one dump
    ``golden`` with each other (no ``target``). ``ray="auto"`` or ``"HOST:PORT"`` measures the pairs on
    a Ray cluster (``pip install 'llmdiff[ray]'``; the dumps must be readable where the tasks run): the
    same report as a local compare.

    Returns a :class:`~llmdiff.report.model.Report` with ``verdict``, ``first_divergence``,
    ``culprits``, ``tokens``, ``entries`` and ``to_markdown/to_csv/to_json/to_html(path)``.
    """
    options = options_from(rtol=rtol, atol=atol, steps=steps, modules=modules, thresholds=thresholds,
                           mapping=mapping, metrics=metrics, algorithms=algorithms, allow_missing=allow_missing,
                           preset=preset, level=level, workers=workers, progress=progress, engines=engines)
    with collector_paused() as read:
        return _compare(golden, target, options, across_ranks, ray, read)


def _compare(golden: str | Path | Dump, target: str | Path | Dump | None, options: Options, across_ranks: bool,
             ray: str | None, read: Callable[[], None]) -> Report:
    golden_dump = golden if isinstance(golden, Dump) else open_dump(golden)
    if across_ranks:
        if target is not None:
            raise UsageError("across_ranks compares the ranks of one dump: give no target")
        read()
        return Report(compare_ranks(golden_dump, options))
    if target is None:
        raise UsageError("compare needs a target dump (or across_ranks=True)")
    target_dump = target if isinstance(target, Dump) else open_dump(target)
    read()  # the entries just read live until the end: collections need not walk them
    if ray is not None:
        from llmdiff.compare.distributed import compare_on_ray

        return Report(compare_on_ray(golden_dump, target_dump, options, ray))
    return Report(compare_dumps(golden_dump, target_dump, options))


def compare_weights(golden: str | Path | Dump, target: str | Path | Dump, *, rtol: float | None = None,
                    atol: float | None = None, thresholds: dict[str, float] | None = None,
                    mapping: Mapping | str | Path | None = None, modules: Sequence[str] | str | None = None,
                    allow_missing: bool = False) -> Report:
    """Compare two weight sets tensor by tensor: ``.safetensors`` files or folders (sharded too),
    ``.pt``/``.bin`` state dicts, GGUF files (dequantized; Llama names mapped to Hugging Face's) or
    dumps captured with ``weights=True``. Entries come out worst first (largest relative error)."""
    from llmdiff.store.weights import open_weights

    options = options_from(rtol=rtol, atol=atol, thresholds=thresholds, mapping=mapping, modules=modules,
                           allow_missing=allow_missing)
    with collector_paused() as read:
        golden_set = golden if isinstance(golden, Dump) else open_weights(golden)
        target_set = target if isinstance(target, Dump) else open_weights(target)
        read()
        comparison = compare_dumps(golden_set, target_set, options)
    comparison.entries.sort(key=lambda e: (e.status == "pass", -(e.error if e.error is not None else float("inf"))))
    comparison.culprits = []
    return Report(comparison)
