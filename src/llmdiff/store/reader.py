"""Read an llmdiff dump back: entries in execution order, finished steps, and what could not be trusted.

Reading never executes code from the dump: metadata is JSON and tensor data is safetensors, small
shards read whole and large ones tensor by tensor. Lines that are torn, steps that never finished and shards that are
missing or half-written are left out of ``entries`` and listed in ``problems`` instead.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from llmdiff.errors import DumpError
from llmdiff.gcpause import collector_paused
from llmdiff.store.schema import (
    MANIFEST_FILE,
    PARTIAL_SUFFIX,
    PROCESS_FILE,
    RUN_FILE,
    Entry,
    RecordError,
    StepRecord,
    decode_line,
)

if TYPE_CHECKING:  # imported where a tensor is read: opening a dump, `llmdiff show`, needs no torch
    import torch

#: Shards kept open or in memory at once, and the bytes of those read whole (least recently used go first).
OPEN_SHARDS = 64
CACHED_BYTES = 256 << 20
MAPPED_SHARDS = 4  # large shards kept open (their file handles)
#: Shards up to this size are read whole into memory (decode steps write many small ones).
SMALL_SHARD = 16 << 20
_SHARD_NAME = re.compile(r"shard-\d{6}\.safetensors")


@dataclass
class ProcessDump:
    """One process folder of a dump."""

    folder: Path
    info: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    unfinished: int = 0


@dataclass
class Dump:
    """A dump opened for reading. ``entries`` holds only entries of finished steps, in execution order."""

    path: Path
    run: dict[str, Any]
    processes: list[ProcessDump]
    problems: list[str]
    format: str = "llmdiff"
    #: how a format that is not file-per-tensor reads an entry's tensor (weight files, GGUF)
    loader: Callable[[Entry], torch.Tensor] | None = field(default=None, repr=False)
    _handles: OrderedDict[tuple[str, str], Any] = field(default_factory=OrderedDict, repr=False)
    _sizes: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def entries(self) -> list[Entry]:
        return [e for p in self.processes for e in p.entries]

    @property
    def steps(self) -> list[StepRecord]:
        return [s for p in self.processes for s in p.steps]

    def process_folder(self, process: str) -> Path:
        """The folder of the process named ``process`` (an entry's ``process`` field)."""
        for proc in self.processes:
            if proc.folder.name == process:
                return proc.folder
        return self.path

    def data_file(self, entry: Entry) -> Path | None:
        """The file holding ``entry``'s tensor (None for a stats-only entry)."""
        if entry.data is None:
            return None
        if self.format != "llmdiff":  # foreign readers name files relative to the dump folder
            return self.path / entry.data["file"]
        return self.process_folder(entry.process) / entry.data["file"]

    def load(self, entry: Entry) -> torch.Tensor:
        """The full tensor of ``entry`` (on the CPU). Raises DumpError for a stats-only entry.

        Foreign ``.pt`` files are read with ``torch.load(weights_only=True)``: never code from a dump.
        """
        if entry.data is None:
            raise DumpError(f"{entry.name}: only statistics were captured (use mode='tensor')")
        if self.loader is not None:
            return self.loader(entry)
        if self.format != "llmdiff":
            from llmdiff.store.formats.torchfile import load_tensor

            file = self.data_file(entry)
            assert file is not None
            if not inside(file, self.path):
                raise DumpError(f"{file}: leads outside the dump folder (a symlink?); not read")
            return load_tensor(file, entry.data.get("key", ""))
        key = (entry.process, entry.data["file"])
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                self._handles.move_to_end(key)
        if handle is None:
            file = self.process_folder(entry.process) / entry.data["file"]
            try:
                size = file.stat().st_size
                if size <= SMALL_SHARD:  # one read beats thousands of small lookups
                    handle = _WholeShard(file)
                else:
                    handle, size = _LargeShard(file), 0
            except (OSError, SafetensorError, ValueError) as exc:  # ValueError: a header that is not JSON
                raise DumpError(f"cannot read {file}: {exc}") from None
            with self._lock:
                self._handles[key], self._sizes[key] = handle, size
                # least recently used first: unmapping a finished shard gives its pages back, and a view
                # that gathers rows from many steps (a cross-engine compare) keeps its shards at hand
                while len(self._handles) > 1 and (len(self._handles) > OPEN_SHARDS
                                                  or sum(self._sizes.values()) > CACHED_BYTES
                                                  or sum(not n for n in self._sizes.values()) > MAPPED_SHARDS):
                    oldest = next(iter(self._handles))
                    del self._handles[oldest], self._sizes[oldest]
        try:
            return handle.get_tensor(entry.data["key"])
        except (KeyError, SafetensorError) as exc:
            raise DumpError(f"{entry.data['file']}: no tensor {entry.data['key']!r} ({exc})") from None
        except (OSError, ValueError) as exc:
            raise DumpError(f"{entry.data['file']}: cannot read tensor {entry.data['key']!r} ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._handles.clear()
            self._sizes.clear()


#: The note of an entry whose tensor data is gone (a shard missing, truncated, misnamed or outside the dump).
DATA_MISSING = "data file missing"


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies inside ``root``: a dump's files never lead elsewhere."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def read_json_file(path: Path, problems: list[str], root: Path) -> dict[str, Any]:
    """A JSON object from a regular file inside ``root``; anything else is a listed problem and ``{}``.
    Never blocks: FIFOs and devices are not regular files."""
    if not path.exists() and not path.is_symlink():
        return {}
    if not inside(path, root):
        problems.append(f"{path}: leads outside the dump folder (a symlink?); not read")
        return {}
    if not path.is_file():
        problems.append(f"{path}: not a regular file; not read")
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        problems.append(f"{path}: unreadable ({type(exc).__name__}); ignored")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object; ignored")
        return {}
    return data


#: safetensors' dtype names (what its header holds) for the dtypes llmdiff writes, as torch's names them
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "C64": "complex64", "C128": "complex128"}


class _Shard:
    """A safetensors shard read by its documented layout (8-byte length, then JSON of dtype, shape and byte
    range per tensor, then the data); the header was validated by ``safe_open`` when the dump was opened."""

    def __init__(self, file: Path) -> None:
        self._path = file
        self._fallback: Any = None

    def _read_header(self, head: bytes | bytearray) -> None:
        length = int.from_bytes(head[:8], "little")
        self._header: dict[str, Any] = json.loads(head[8:8 + length])
        self._base = 8 + length

    def get_tensor(self, key: str) -> torch.Tensor:
        import torch

        info = self._header.get(key) if key != "__metadata__" else None
        if not isinstance(info, dict):
            raise KeyError(key)
        name = _SAFETENSORS_DTYPES.get(info.get("dtype", ""))
        dtype = getattr(torch, name) if name is not None else None
        if dtype is None:  # a dtype llmdiff does not write (float8...): safetensors reads it
            self._fallback = self._fallback or safe_open(str(self._path), framework="pt")
            tensor: torch.Tensor = self._fallback.get_tensor(key)
            return tensor
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        return self._data(self._base + start, self._base + end, dtype).reshape(info["shape"])

    def _data(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class _WholeShard(_Shard):
    """A small shard read whole, with one read; its tensors are views of that memory (no copy each)."""

    def __init__(self, file: Path) -> None:
        super().__init__(file)
        with open(file, "rb") as f:
            self._bytes = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(self._bytes) != len(self._bytes):
                raise OSError("the shard changed while it was read")
        self._read_header(self._bytes[:8 + int.from_bytes(self._bytes[:8], "little")])

    def _data(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        import torch

        if end > len(self._bytes):
            raise ValueError("the shard is shorter than its header says")
        return torch.frombuffer(self._bytes, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)


#: Tensors of at least this many bytes are mapped from their shard rather than read: the kernel maps the page
#: cache's own pages where a read first zero-fills fresh pages, then copies into them (a 270 MB prefill shard
#: of 1-3 MB tensors, touched whole: 0.05 s mapped, 0.15 s read).
MAP_BYTES = 1 << 20


class _LargeShard(_Shard):
    """A large shard read one tensor at a time: a large tensor is a private (copy-on-write) mapping of its
    own bytes, a small one a positioned read into fresh memory.

    safetensors' ``safe_open`` maps the whole file, and every page a compare touches then counts as the
    process's memory until the shard is closed: comparing two 256 MB shards held 1.7 GB. A mapping per
    tensor, undone when the tensor is freed, keeps the memory to the tensors in use.
    """

    def __init__(self, file: Path) -> None:
        super().__init__(file)
        self._file = open(file, "rb")  # noqa: SIM115 - closed when the handle is dropped
        head = self._file.read(8)
        self._read_header(head + self._file.read(int.from_bytes(head, "little")))

    def _data(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        import torch

        fd = self._file.fileno()
        if end - start >= MAP_BYTES and start % dtype.itemsize == 0 and hasattr(mmap, "MAP_PRIVATE"):
            # A mapped page past the end of the file would be a SIGBUS on access, not an error: check first.
            if os.fstat(fd).st_size < end:
                raise ValueError("the shard is shorter than its header says")
            base = start - start % mmap.ALLOCATIONGRANULARITY
            try:
                mapped = mmap.mmap(fd, end - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=base)
            except OSError:  # a file system that cannot map files: read it
                pass
            else:
                # the tensor holds the mapping, which is undone once the tensor (and any view of it) is freed
                return torch.frombuffer(mapped, dtype=dtype, offset=start - base,
                                        count=(end - start) // dtype.itemsize)
        data = bytearray(end - start)
        if os.preadv(fd, [data], start) != end - start:
            raise ValueError("the shard is shorter than its header says")
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype)

def _shard_readable(file: Path, root: Path) -> bool:
    if not (inside(file, root) and file.is_file()):
        return False
    try:  # the header names every tensor's byte range; a truncated shard fails here
        with safe_open(str(file), framework="numpy") as handle:  # "pt" would import torch
            handle.keys()
        return True
    except (OSError, SafetensorError, ValueError):
        return False


def read_process(folder: Path, problems: list[str], root: Path | None = None) -> ProcessDump:
    """Read one process folder; what cannot be trusted is appended to ``problems``."""
    root = root or folder
    proc = ProcessDump(folder, read_json_file(folder / PROCESS_FILE, problems, root))
    for partial in sorted(folder.glob("*" + PARTIAL_SUFFIX)):
        problems.append(f"{partial}: half-written shard ignored (the process was interrupted)")
    pending: list[Entry] = []
    shard_ok: dict[str, bool] = {}
    manifest = folder / MANIFEST_FILE
    if not (inside(manifest, root) and manifest.is_file()):
        problems.append(f"{manifest}: not a regular file inside the dump; process folder skipped")
        return proc
    with open(manifest, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                record = decode_line(raw)
                kind = record["kind"] if isinstance(record, dict) else None
                parsed = (StepRecord.from_json(record) if kind == "step" else
                          Entry.from_json(record, process=folder.name) if kind == "entry" else None)
            except RecordError as exc:
                problems.append(f"{manifest}:{number}: bad {kind} line ignored ({exc})")
                continue
            except (ValueError, KeyError, TypeError, RecursionError):
                problems.append(f"{manifest}:{number}: unreadable line ignored (torn write?)")
                continue
            if isinstance(parsed, StepRecord):
                proc.steps.append(parsed)
                proc.entries.extend(pending)
                pending = []
            elif isinstance(parsed, Entry):
                entry = parsed
                if entry.data is not None:
                    name = entry.data["file"]
                    if name not in shard_ok:
                        shard_ok[name] = bool(_SHARD_NAME.fullmatch(name)) and _shard_readable(folder / name, root)
                        if not shard_ok[name]:
                            problems.append(f"{folder / name}: data file missing, truncated, misnamed or outside "
                                            "the dump; its entries are kept as statistics only")
                    if not shard_ok[name]:
                        entry.data, entry.note = None, DATA_MISSING
                pending.append(entry)
    if pending:
        proc.unfinished = len(pending)
        problems.append(f"{folder}: {len(pending)} entries of an unfinished step ignored "
                        "(the process stopped mid-step)")
    return proc


def _process_folders(path: Path) -> Iterator[Path]:
    if (path / MANIFEST_FILE).is_file():
        yield path
        return
    try:
        children = sorted(path.iterdir(), key=lambda p: (len(p.name), p.name))
    except OSError:
        return
    for child in children:
        if child.is_dir() and (child / MANIFEST_FILE).is_file():
            yield child


def open_llmdiff_dump(path: Path) -> Dump:
    """Open a run folder (or one process folder) written by llmdiff."""
    problems: list[str] = []
    processes = []
    for folder in _process_folders(path):
        if inside(folder, path):
            processes.append(read_process(folder, problems, path))
        else:
            problems.append(f"{folder}: leads outside the dump folder (a symlink?); not read")
    run = read_json_file(path / RUN_FILE, problems, path)
    if not run and not (path / RUN_FILE).exists():  # a process folder opened on its own
        run = read_json_file(path.parent / RUN_FILE, [], path.parent)
    return Dump(path, run, processes, problems)


def is_llmdiff_dump(path: Path) -> bool:
    return (path / RUN_FILE).is_file() or (path / MANIFEST_FILE).is_file() or any(_process_folders(path))


def open_dump(path: str | Path) -> Dump:
    """Open a dump folder for reading: llmdiff's own, or one written by msProbe, msIT, vLLM's
    intermediate logging or SGLang's dumper (see :mod:`llmdiff.store.formats`). Raises
    :class:`DumpError` when it is none of these."""
    folder = Path(path)
    if not folder.exists():
        raise DumpError(f"{folder}: no such dump folder")
    if not folder.is_dir():
        raise DumpError(f"{folder}: a dump is a folder, not a file")
    with collector_paused():  # tens of thousands of entries that all live on: half the time was full collections
        if is_llmdiff_dump(folder):
            return open_llmdiff_dump(folder)
        from llmdiff.store.formats import open_foreign_dump

        dump = open_foreign_dump(folder)
    if dump is None:
        raise DumpError(f"{folder}: not a dump llmdiff can read (neither llmdiff's run.json/manifest.jsonl nor an "
                        "msProbe, msIT, vLLM or SGLang dump layout)")
    return dump
