"""Read msProbe (MindStudio Probe) PyTorch dumps: ``step*/{rank*,proc*}/dump.json`` (+ ``construct.json``,
``dump_tensor_data/*.pt``), in statistics or tensor mode.

msProbe names a module call ``Module.<path>.<Class>.forward.<n>``, with ``n`` counting the calls of
that module since ``debugger.start()``: a whole ``generate`` inside one debugger step numbers its
prefill and decode calls 0, 1, 2... llmdiff's steps are forward passes of the model, so ``n`` is split
into (step, call): ``construct.json`` names each call's parent, which gives the forward pass a call
belongs to (its outermost ancestor); without it, the module called least often is taken to run once
per forward pass. Debugger steps follow each other (``step1`` starts after the last pass of ``step0``).

API calls (levels L1 and mix, ``Torch.matmul.3.forward``) become ops named inside the module that
ran them (``model.layers.0.self_attn/matmul``), which ``construct.json`` tells; those outside any
module are left out, as llmdiff's op-level capture leaves them out.

Inputs by position become part ``input`` (path ``0``, ``1``...), by keyword part ``kwarg``, module
parameters part ``param``. msProbe always lists outputs; a single output is unwrapped (path ``""``
or the field name), as llmdiff records it. Statistics ``Max/Min/Mean/Norm`` become ``max/min/mean/norm``
(and ``md5`` when ``summary_mode`` was md5).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from llmdiff.config import normalize_op_name
from llmdiff.errors import DumpError
from llmdiff.store.reader import Dump, ProcessDump, inside
from llmdiff.store.schema import Entry, StepRecord

FORMAT = "msprobe"
_CALL_KEY = re.compile(r"^(?:Module|Cell)\.(?P<path>.+)\.(?P<cls>[^.]+)\.(?P<dir>forward|backward)\.(?P<n>\d+)$")
_API_KEY = re.compile(r"^(?P<kind>Functional|Tensor|Torch|Aten|NPU|Distributed|VF|MindSpore|Mint|Jit|Primitive)\."
                      r"(?P<name>.+)\.(?P<n>\d+)\.(?P<dir>forward|backward)$")
_STEP = re.compile(r"^step(\d+)$")
_PROC = re.compile(r"^(rank|proc)(\d*)$")
_STATS = {"Max": "max", "Min": "min", "Mean": "mean", "Norm": "norm", "md5": "md5"}


def is_msprobe_dump(path: Path) -> bool:
    return bool(_dump_files(path))


def _dump_files(path: Path) -> list[tuple[int, Path]]:
    """(debugger step, process folder) for every dump.json under ``path``, in order."""
    found: list[tuple[int, Path]] = []
    if (path / "dump.json").is_file():
        step = _STEP.match(path.parent.name)
        return [(int(step[1]) if step else 0, path)]
    for folder in sorted(path.glob("*/dump.json")):
        step = _STEP.match(path.name)
        found.append((int(step[1]) if step else 0, folder.parent))
    for folder in path.glob("step*/*/dump.json"):
        step = _STEP.match(folder.parent.parent.name)
        if step:
            found.append((int(step[1]), folder.parent))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def _read_json(path: Path) -> Any:
    if not path.is_file():  # a FIFO would block
        raise DumpError(f"{path}: not a regular file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise DumpError(f"{path}: not a readable msProbe file ({type(exc).__name__}: {str(exc)[:160]})") from None


def _shape(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(type(d) is int and d >= 0 for d in value):
        return value
    return None


def _stats(record: dict[str, Any]) -> dict[str, Any]:
    return {ours: record[theirs] for theirs, ours in _STATS.items() if theirs in record}


def _tensors(value: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Flatten msProbe's nested argument records into (dotted path, tensor record)."""
    if isinstance(value, dict):
        if value.get("type") in ("torch.Tensor", "mindspore.Tensor") or ("dtype" in value and "shape" in value):
            return [(path, value)]
        out = []
        for key, item in value.items():
            out.extend(_tensors(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            out.extend(_tensors(item, f"{path}.{i}" if path else str(i)))
        return out
    return []


def _named(keys: list[str], construct: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """(llmdiff module name, type) per call key. An API call (levels L1/mix) becomes an op named inside
    the module that ran it, as llmdiff's op-level capture names it (``model.layers.0.self_attn/softmax``);
    API calls outside any module (a ``generate`` loop's own) are left out, as llmdiff leaves them out."""
    named: dict[str, tuple[str, str]] = {}
    for key in keys:
        module = _CALL_KEY.match(key)
        if module:
            named[key] = (module["path"], module["cls"])
            continue
        api = _API_KEY.match(key)
        parent = _CALL_KEY.match(construct.get(key) or "") if api else None
        if api and parent:
            named[key] = (f"{parent['path']}/{normalize_op_name(api['name'])}", "op")
        elif not api:
            named[key] = (key, "")
    return named


def _split_calls(keys: list[str], names: dict[str, tuple[str, str]],
                 construct: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Map each call key to (forward pass within the debugger step, call index within that pass)."""

    def top(key: str) -> str | None:
        seen = 0
        while construct.get(key) is not None and seen < 1000:
            key, seen = construct[key], seen + 1
        return key if key in construct else None

    tops = {k: top(k) for k in keys} if construct else {}
    result: dict[str, tuple[int, int]] = {}
    calls: Counter[tuple[int, str]] = Counter()
    if tops and all(t is not None for t in tops.values()):
        # Outermost module calls, in order, grouped into passes: a new pass starts when a module that
        # already ran as an outermost call in the current pass runs again.
        pass_of: dict[str, int] = {}
        current, seen_modules = 0, set[str]()
        for key, parent in construct.items():
            module = _CALL_KEY.match(key)
            if parent is not None or not module:
                continue
            if module["path"] in seen_modules:
                current, seen_modules = current + 1, set()
            seen_modules.add(module["path"])
            pass_of[key] = current
        for key in keys:
            step = pass_of.get(tops[key] or "", 0)
            name = names[key][0]
            result[key] = (step, calls[(step, name)])
            calls[(step, name)] += 1
        return result
    counts = Counter(names[key][0] for key in keys)  # no construct.json: the least-called module runs once a pass
    per_pass = min(counts.values()) if counts else 1
    for key in keys:
        name = names[key][0]
        k = max(1, counts[name] // per_pass)
        n = calls[(0, name)]
        calls[(0, name)] += 1
        result[key] = (n // k, n % k)
    return result


def open_msprobe_dump(path: Path) -> Dump:
    """Open an msProbe dump folder: its root, one ``stepN`` folder, or one ``rankN``/``procN`` folder."""
    problems: list[str] = []
    processes: dict[str, ProcessDump] = {}
    offsets: dict[str, int] = defaultdict(int)  # forward passes already numbered, per process
    files = _dump_files(path)
    proc_names = sorted({f.name for _, f in files if f.name.startswith("proc")})
    for _, folder in files:
        if not (inside(folder / "dump.json", path) and inside(folder / "construct.json", path)):
            problems.append(f"{folder}: its dump.json or construct.json leads outside the dump folder (a symlink?); "
                            "not read")
            continue
        dump = _read_json(folder / "dump.json")
        if not isinstance(dump, dict) or not isinstance(dump.get("data"), dict):
            raise DumpError(f"{folder / 'dump.json'}: not an msProbe dump.json (no 'data' object)")
        construct_file = folder / "construct.json"
        construct = _read_json(construct_file) if construct_file.is_file() else {}
        rank_match = _PROC.match(folder.name)
        if rank_match and rank_match[1] == "rank" and rank_match[2]:
            rank = int(rank_match[2])
        else:  # procN is named by pid: number the processes in order instead
            rank = proc_names.index(folder.name) if folder.name in proc_names else 0
        proc = processes.setdefault(folder.name, ProcessDump(folder, {"format": FORMAT, "task": dump.get("task"),
                                                                      "level": dump.get("level")}))
        base = folder.relative_to(path).as_posix() if folder != path else ""
        construct = construct if isinstance(construct, dict) else {}
        # each key names its parent call (or null): anything else in a hand-edited file is dropped
        construct = {k: v for k, v in construct.items() if v is None or isinstance(v, str)}
        keys = [k for k in dump["data"] if isinstance(dump["data"][k], dict) and not k.endswith(".backward")
                and ".backward." not in k]
        names = _named(keys, construct)
        keys = [k for k in keys if k in names]
        where = _split_calls(keys, names, construct)
        offset = offsets[folder.name]
        steps_here: Counter[int] = Counter()
        for key in keys:
            record = dump["data"][key]
            module, type_name = names[key]
            step, call = where[key]
            step += offset
            outputs = record.get("output")
            if isinstance(outputs, list) and len(outputs) == 1:
                outputs = outputs[0]  # msProbe wraps every output in a list; llmdiff does not
            parts = (("input", record.get("input_args")), ("kwarg", record.get("input_kwargs")),
                     ("output", outputs), ("param", record.get("parameters")))
            for part, value in parts:
                for tensor_path, tensor in _tensors(value, ""):
                    shape = _shape(tensor.get("shape") or [])
                    if shape is None:
                        problems.append(f"{folder / 'dump.json'}: {key} {part} {tensor_path}: shape "
                                        f"{str(tensor.get('shape'))[:40]} is not a list of sizes; ignored")
                        continue
                    entry = Entry(seq=len(proc.entries), rank=rank, step=step, module=module, type=type_name,
                                  call=call, part=part, path=tensor_path, shape=shape,
                                  dtype=str(tensor.get("dtype", "")).removeprefix("torch."), device="",
                                  stats=_stats(tensor), process=folder.name)
                    data_name = tensor.get("data_name")
                    if isinstance(data_name, str) and data_name:
                        if "/" in data_name or "\\" in data_name or data_name.startswith("."):
                            problems.append(f"{folder}: {data_name!r} is not a plain file name; ignored")
                        elif (folder / "dump_tensor_data" / data_name).is_file():
                            file = f"dump_tensor_data/{data_name}"
                            entry.data = {"file": f"{base}/{file}" if base else file, "key": ""}
                        else:
                            entry.note = "tensor file missing"
                    proc.entries.append(entry)
                    steps_here[step] += 1
        for step in sorted(steps_here):
            proc.steps.append(StepRecord(rank, step, None, steps_here[step]))
        offsets[folder.name] = max(steps_here, default=offset - 1) + 1
    if not processes:
        raise DumpError(problems[0] if problems else f"{path}: no msProbe dump.json found")
    for proc in processes.values():
        proc.entries.sort(key=lambda e: (e.step, e.seq))
        for seq, entry in enumerate(proc.entries):
            entry.seq = seq
    return Dump(path, {"format": FORMAT}, list(processes.values()), problems, format=FORMAT)
