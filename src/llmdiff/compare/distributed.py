"""Comparing on a Ray cluster: the pairs measured by tasks, one localization over all their results.

The driver makes the plan (:func:`llmdiff.compare.engine.plan`: views, alignment, token bookkeeping;
manifests only, no tensor), cuts its pairs into tasks of one rank and a range of steps each, and
sends each task the dump paths, the options and its range of pair indices. A worker rebuilds the
same plan from the same dumps (once per worker process), measures its range and returns the
results: small records, never tensors. The driver then concludes exactly as a local compare does:
the same pairs, statuses, culprits and verdict (metric values agree to float rounding, since a task
sums on one thread where a local compare uses several).

The dumps must be readable at the same paths where the tasks run (shared storage, or one machine).
Ray is an optional extra: ``pip install 'llmdiff[ray]'``.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmdiff.compare.engine import (
    Options,
    Plan,
    close,
    conclude,
    conclude_ranks,
    load_algorithm,
    measure,
    plan,
    rank_summary,
    ranks_plan,
)
from llmdiff.compare.results import Comparison, EntryResult
from llmdiff.compare.unshard import tp_ranks
from llmdiff.errors import LlmdiffError, UsageError
from llmdiff.store.reader import Dump, open_dump

#: tasks per CPU of the cluster (more than one: tasks differ in size, the last ones fill the gaps)
TASKS_PER_CPU = 4

# What a task is asked to rebuild: ("pair", golden path, target path, options) or ("ranks", path, options).
Job = tuple[Any, ...]


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed: pip install 'llmdiff[ray]'") from None
    return ray


def _portable(options: Options) -> Options:
    """Options a worker can receive: no progress callback; user metrics travel as their specs."""
    return replace(options, progress=None, algorithms={})


def _job_plan(job: Job) -> Plan:
    options: Options = job[-1]
    if options.algorithm_specs:
        options = replace(options, algorithms=dict(load_algorithm(s) for s in options.algorithm_specs))
    if job[0] == "ranks":
        return ranks_plan(open_dump(job[1]), options)
    return plan(open_dump(job[1]), open_dump(job[2]), options, check_ranks=False)


_plans: dict[str, Plan] = {}  # in a worker process: the plans of the jobs it ran tasks of


def _measure_task(key: str, job: Job, start: int, stop: int) -> tuple[int, list[EntryResult]]:
    import torch

    # A task holds one CPU: more threads would fight the tasks beside it (measured 3.5x slower with two).
    # Sums over other thread counts round differently: metric values agree with a local compare to
    # about 1e-7 relative, statuses and verdicts are the same.
    torch.set_num_threads(1)
    found = _plans.get(key)
    if found is None:
        found = _plans[key] = _job_plan(job)
    return os.getpid(), measure(found, range(start, stop))


def task_ranges(p: Plan, tasks: int) -> list[range]:
    """Contiguous ranges of the plan's pair indices, each within one rank and one range of steps."""
    pairs = p.pairs
    if not pairs:
        return []
    steps = sorted({pair.any.step for pair in pairs})
    ranks = {pair.any.rank for pair in pairs}
    per_task = max(1, math.ceil(len(steps) * len(ranks) / max(tasks, 1)))
    bucket = {step: i // per_task for i, step in enumerate(steps)}
    ranges, start = [], 0
    for i in range(1, len(pairs) + 1):
        if i == len(pairs) or (pairs[i].any.rank, bucket[pairs[i].any.step]) != (
                pairs[start].any.rank, bucket[pairs[start].any.step]):
            ranges.append(range(start, i))
            start = i
    return ranges


def _run(ray: Any, remote: Any, job: Job, p: Plan, tasks: int, progress: Any, workers: set[int]
         ) -> list[EntryResult]:
    key = repr(job)
    ranges = task_ranges(p, tasks)
    job_ref = ray.put(job)
    futures = [remote.remote(key, job_ref, r.start, r.stop) for r in ranges]
    parts: dict[int, list[EntryResult]] = {}
    done_count = 0
    pending = {f: i for i, f in enumerate(futures)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            try:
                pid, parts[i] = ray.get(ref)
                workers.add(pid)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                if isinstance(cause, LlmdiffError):
                    raise type(cause)(str(cause)) from None
                raise LlmdiffError(f"a Ray task failed: {type(cause).__name__}: {cause}") from None
            done_count += len(parts[i])
            if progress:
                progress(done_count, len(p.pairs))
    return [result for i in range(len(futures)) for result in parts[i]]


def compare_on_ray(golden: Dump, target: Dump, options: Options, address: str = "auto") -> Comparison:
    """:func:`~llmdiff.compare.engine.compare_dumps` with the pairs measured by tasks on a Ray cluster
    (``address``: ``"auto"`` for the cluster ``RAY_ADDRESS`` or ``ray start`` names, else a new local one;
    or ``HOST:PORT``). Same results as the local compare."""
    ray = _ray()
    if golden.loader is not None or target.loader is not None:
        raise UsageError("--ray: these dumps are read through a custom loader that workers cannot rebuild")
    try:
        ray.init(address=None if address in ("auto", "") else address, ignore_reinit_error=True,
                 log_to_driver=False, include_dashboard=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--ray {address}: cannot reach a Ray cluster ({str(exc).splitlines()[0]})") from None
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks = max(1, cpus * TASKS_PER_CPU)
    remote = ray.remote(num_cpus=1)(_measure_task)
    portable = _portable(options)
    paths = (str(Path(golden.path).resolve()), str(Path(target.path).resolve()))
    p = plan(golden, target, options, check_ranks=False)
    workers: set[int] = set()  # the worker processes that ran tasks
    try:
        for label, base, path in zip(("golden", "target"), p.bases, paths, strict=True):
            if tp_ranks(base):
                ranks_job: Job = ("ranks", path, portable)
                rp = ranks_plan(base, options)
                measured = _run(ray, remote, ranks_job, rp, tasks, None, workers)
                p.ranks_agree[label] = rank_summary(conclude_ranks(rp, measured))
        entries = _run(ray, remote, ("pair", *paths, portable), p, tasks, options.progress, workers)
    finally:
        close(p)
    comparison = conclude(p, entries)
    comparison.settings["ray"] = {"address": address, "cpus": cpus, "tasks": len(task_ranges(p, tasks)),
                                  "worker_processes": len(workers)}
    return comparison

