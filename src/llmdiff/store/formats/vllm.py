"""Read vLLM intermediate-logging dumps (``--intermediate-log-config``):
``<output_dir>/<run id>/step_<N>/<module>[_<k>]/{inputs_<i>_<device>.pt, outputs[_<i>]_<device>.pt, *.json}``.

``step_<N>`` is the engine step (one forward pass), as llmdiff's steps. A module folder ending in
``_<k>`` holds its ``k``-th call of the step (vLLM's ``:k`` filter); without it, call 0. Each device
(``cuda_1`` → ``cuda:1``) is one rank. The ``.json`` files only repeat metadata and are not needed;
``.pt`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path

from llmdiff.errors import DumpError
from llmdiff.store.formats.common import close_steps, describe_or_report
from llmdiff.store.reader import Dump, ProcessDump
from llmdiff.store.schema import Entry

FORMAT = "vllm"
_STEP = re.compile(r"^step_(\d+)$")
_FILE = re.compile(r"^(?P<part>inputs|outputs)(?:_(?P<index>\d+))?_(?P<dev>[a-z]+(?:_\d+)?)\.pt$")
_CALL = re.compile(r"^(?P<module>.+?)_(?P<call>\d+)$")


def _run_folder(path: Path) -> Path | None:
    """The folder holding ``step_N`` folders: ``path`` itself, its only run sub-folder, or its parent."""
    if _STEP.match(path.name) and path.is_dir():
        return path.parent
    if any(_STEP.match(p.name) for p in path.iterdir() if p.is_dir()):
        return path
    runs = [p for p in path.iterdir() if p.is_dir() and any(_STEP.match(c.name) for c in p.iterdir() if c.is_dir())]
    return runs[0] if len(runs) == 1 else None


def is_vllm_dump(path: Path) -> bool:
    run = _run_folder(path)
    return run is not None and any(run.glob("step_*/*/*puts*.pt"))


def _device(name: str) -> tuple[str, int]:
    kind, _, index = name.partition("_")
    return (f"{kind}:{index}", int(index)) if index else (kind, 0)


def open_vllm_dump(path: Path) -> Dump:
    """Open a vLLM intermediate-logging run (its run folder, its ``output_dir`` or one ``step_N``)."""
    run = _run_folder(path)
    if run is None:
        raise DumpError(f"{path}: no vLLM step_N folders found (or several runs: pick one)")
    only_step = _STEP.match(path.name)
    step_dirs = [path] if only_step else sorted((p for p in run.iterdir() if p.is_dir() and _STEP.match(p.name)),
                                                key=lambda p: int(p.name[5:]))
    problems: list[str] = []
    processes: dict[int, ProcessDump] = {}
    for step_dir in step_dirs:
        step = int(step_dir.name[5:])
        for module_dir in sorted(p for p in step_dir.iterdir() if p.is_dir()):
            call_match = _CALL.match(module_dir.name)
            module, call = (call_match["module"], int(call_match["call"])) if call_match else (module_dir.name, 0)
            for file in sorted(module_dir.glob("*.pt"), key=lambda f: (f.name.startswith("outputs"), f.name)):
                m = _FILE.match(file.name)
                if not m:
                    continue
                device, rank = _device(m["dev"])
                proc = processes.setdefault(rank, ProcessDump(run, {"format": FORMAT, "device": device}))
                tensors = describe_or_report(file, problems, path)
                part = "input" if m["part"] == "inputs" else "output"
                for key, shape, dtype in tensors:
                    tensor_path = ".".join(p for p in (m["index"] or "", key) if p)
                    proc.entries.append(Entry(
                        seq=len(proc.entries), rank=rank, step=step, module=module, type="", call=call, part=part,
                        path=tensor_path, shape=shape, dtype=dtype, device=device, stats=None,
                        data={"file": file.relative_to(run).as_posix(), "key": key}, process=f"rank{rank}"))
    for rank, proc in processes.items():
        close_steps(proc, rank)
    return Dump(run, {"format": FORMAT}, list(processes.values()), problems, format=FORMAT)
