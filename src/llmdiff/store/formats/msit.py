"""Read msIT LLM torch dumps (``DumpConfig`` + ``register_hook``):
``msit_dump_<time>/torch_tensors/<device>_<pid>/<token>/<module>/{input_<i>,output,output_<i>}.pth``,
``model_tree.json`` beside the token folders, ``weights/<param>.pth`` with ``dump_weight``.

Tokens are forward passes of the root module, as llmdiff's steps. msIT names modules ``root.<path>``;
the ``root.`` prefix is dropped. It saves positional inputs only (no keyword arguments) and no
``ModelOutput`` outputs, and a module called twice in one pass keeps its last call: what it has is
call 0. ``output_0_1.pth`` is path ``0.1``. Files are opened with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llmdiff.errors import DumpError
from llmdiff.store.formats.common import close_steps, describe_or_report
from llmdiff.store.reader import Dump, ProcessDump
from llmdiff.store.schema import Entry

FORMAT = "msit"
_PROCESS = re.compile(r"^(?P<dev>[a-z]+)(?P<index>\d*)_(?P<pid>\d+)$")
_FILE = re.compile(r"^(?P<part>input|output)(?:_(?P<path>\d+(?:_\d+)*))?\.pth?$")


def _process_folders(path: Path) -> list[Path]:
    candidates = [path, path / "torch_tensors", *path.glob("msit_dump_*/torch_tensors"),
                  *path.glob("torch_tensors")]
    for base in candidates:
        if _PROCESS.match(base.name) and base.is_dir():
            return [base]
        found = sorted(p for p in base.glob("*") if p.is_dir() and _PROCESS.match(p.name)) if base.is_dir() else []
        if found:
            return found
    return []


def is_msit_dump(path: Path) -> bool:
    return any((p / "model_tree.json").is_file() or any(c.name.isdigit() for c in p.iterdir())
               for p in _process_folders(path))


def _module(folder_name: str) -> str:
    return "" if folder_name == "root" else folder_name.removeprefix("root.")


def _types(tree_file: Path) -> dict[str, str]:
    if not tree_file.is_file():  # a FIFO would block
        return {}
    try:
        tree = json.loads(tree_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bad UTF-8
        return {}
    types: dict[str, str] = {}

    def walk(node: Any) -> None:  # post-order: msIT writes a module's files when its call ends
        if isinstance(node, dict):
            children = node.get("children")
            for child in children if isinstance(children, list) else []:
                walk(child)
            types[_module(str(node.get("name", "")))] = str(node.get("type", ""))

    try:
        walk(tree)
    except RecursionError:
        return {}
    return types


def open_msit_dump(path: Path) -> Dump:
    """Open an msIT torch dump: the dump path, ``msit_dump_*``, ``torch_tensors`` or one ``<device>_<pid>`` folder."""
    folders = _process_folders(path)
    if not folders:
        raise DumpError(f"{path}: no msIT torch_tensors/<device>_<pid> folder found")
    problems: list[str] = []
    processes = []
    for index, folder in enumerate(folders):
        match = _PROCESS.match(folder.name)
        assert match is not None
        device = match["dev"] + (f":{match['index']}" if match["index"] else "")
        rank = int(match["index"]) if match["index"] and len(folders) > 1 else index
        types = _types(folder / "model_tree.json")
        proc = ProcessDump(folder, {"format": FORMAT, "pid": int(match["pid"]), "device": device})
        base = folder.relative_to(path).as_posix() if folder != path else ""
        token_dirs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        units: list[tuple[int, str, Path]] = [(int(t.name), m.name, m) for t in token_dirs for m in t.iterdir()
                                              if m.is_dir()]
        weights = folder / "weights"
        for file in sorted(weights.glob("*.pth")) if weights.is_dir() else []:
            module, _, name = _module(file.stem).rpartition(".")
            _add(proc, problems, file, base, rank, 0, module, types.get(module, ""), "param", name, device)
        # A module's position in model_tree.json, children before parents: a stand-in for the order calls end.
        order = {module: i for i, module in enumerate(types)}
        units.sort(key=lambda u: (u[0], order.get(_module(u[1]), len(order))))
        for step, module_dir, module_path in units:
            module = _module(module_dir)
            files = sorted(module_path.iterdir(), key=lambda f: (not f.name.startswith("input"), f.name))
            for file in files:
                m = _FILE.match(file.name)
                if not m:
                    continue
                tensor_path = (m["path"] or "").replace("_", ".")
                _add(proc, problems, file, base, rank, step, module, types.get(module, ""), m["part"], tensor_path,
                     device)
        close_steps(proc, rank)
        processes.append(proc)
    return Dump(path, {"format": FORMAT}, processes, problems, format=FORMAT)


def _add(proc: ProcessDump, problems: list[str], file: Path, base: str, rank: int, step: int, module: str,
         type_name: str, part: str, tensor_path: str, device: str) -> None:
    tensors = describe_or_report(file, problems, proc.folder)
    relative = file.relative_to(proc.folder).as_posix()
    for key, shape, dtype in tensors:
        path = ".".join(p for p in (tensor_path, key) if p)
        proc.entries.append(Entry(seq=len(proc.entries), rank=rank, step=step, module=module, type=type_name, call=0,
                                  part=part, path=path, shape=shape, dtype=dtype, device=device, stats=None,
                                  data={"file": f"{base}/{relative}" if base else relative, "key": key},
                                  process=proc.folder.name))
