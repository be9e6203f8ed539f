"""The on-disk schema of an llmdiff dump: the single place that defines it (see docs/format.md).

A run folder holds ``run.json`` and one sub-folder per process (``rank3`` under torch.distributed,
``proc0``, ``proc1``... otherwise). Each process folder holds:

* ``process.json`` — who wrote it (pid, rank, model, versions), rewritten atomically;
* ``manifest.jsonl`` — append-only, one JSON object per line: ``entry`` lines (one captured tensor)
  and ``step`` lines (a step is complete; everything before it in the file is readable);
* ``shard-NNNNNN.safetensors`` — tensor data, many tensors per file, renamed into place only once
  complete. Manifest lines that point into a shard are written after the shard is in place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import orjson

FORMAT = "llmdiff-dump"
FORMAT_VERSION = 1

RUN_FILE = "run.json"
PROCESS_FILE = "process.json"
MANIFEST_FILE = "manifest.jsonl"
SHARD_TEMPLATE = "shard-{:06d}.safetensors"
PARTIAL_SUFFIX = ".partial"

def encode_line(record: dict[str, Any]) -> bytes:
    """One manifest line. orjson is several times faster than ``json`` (a capture writes thousands of lines
    per step); what it refuses (a lone surrogate in a name given to ``save``) goes through ``json``."""
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except (orjson.JSONEncodeError, TypeError):
        return (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")


def encode_lines(records: list[dict[str, Any]]) -> bytes:
    """The manifest lines of many records (each a JSON object whose first key is ``kind``), the same bytes as
    :func:`encode_line` of each: one orjson call for all of them, its array split between its items. Between
    two items orjson writes ``,{"kind":``, which no string value can hold (its quotes are escaped) and no
    nested object begins with. A capture writes thousands of lines a step; one call a line cost several times
    more (each call allocates and shrinks its own output buffer)."""
    if not records:
        return b""
    try:
        joined = orjson.dumps(records)
    except (orjson.JSONEncodeError, TypeError):
        return b"".join(map(encode_line, records))
    return joined[1:-1].replace(b',{"kind":', b'\n{"kind":') + b"\n"


def decode_line(raw: bytes) -> Any:
    """Parse one manifest line; raises ValueError (or RecursionError) when it is not JSON. Lines that
    orjson refuses but ``json`` reads (NaN, lone surrogate escapes, huge integers) read as before."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


#: part names; ``kwarg`` is an input passed by keyword, ``save`` a tensor given to ``llmdiff.save``,
#: ``param`` a module parameter or buffer (its ``path`` is the parameter's name).
PARTS = ("input", "kwarg", "output", "save", "param")


@dataclass(slots=True)
class Entry:
    """One captured tensor.

    Its key is (rank, step, module, call, part, path); ``seq`` is the execution order within its
    process. ``data`` locates the full tensor (``{"file": shard, "key": name}``) or is None in stats
    mode; ``note`` says why a tensor was reduced to statistics when that was not the mode's choice.
    """

    seq: int
    rank: int
    step: int
    module: str
    type: str
    call: int
    part: str
    path: str
    shape: list[int]
    dtype: str
    device: str
    stats: dict[str, Any] | None
    data: dict[str, str] | None = None
    note: str | None = None
    #: the module on the call stack that called a shared module (vLLM's one ``rotary_emb`` for every layer),
    #: when it is not the module's own parent
    caller: str | None = None
    process: str = ""  # the process folder; set by readers, not stored
    source: str | None = None  # in a cross-engine view: the engine's own entries behind it; not stored
    #: in a tensor-parallel view: (rank, first, end) of the last dimension's columns each rank held; not stored
    shards: tuple[tuple[int, int, int], ...] | None = None

    @property
    def key(self) -> tuple[int, int, str, int, str, str]:
        return (self.rank, self.step, self.module, self.call, self.part, self.path)

    @property
    def name(self) -> str:
        """A readable name: ``model.layers.0.mlp:0 output.0``."""
        where = self.part if not self.path else f"{self.part}.{self.path}"
        return f"{self.module or '<root>'}:{self.call} {where}"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        return entry_record(self.seq, self.rank, self.step, self.module, self.type, self.call, self.part, self.path,
                            self.shape, self.dtype, self.device, self.stats, self.data, self.note, self.caller)

    @classmethod
    def from_json(cls, record: dict[str, Any], process: str = "") -> Entry:
        """Parse a manifest line; a missing or wrong-typed field raises :class:`RecordError` naming it."""
        entry = _well_formed_entry(record, process)
        return entry if entry is not None else cls._checked(record, process)

    @classmethod
    def _checked(cls, record: dict[str, Any], process: str) -> Entry:
        # Field by field, to name what is wrong (or to spell out a non-ASCII name's lone surrogates).
        for key in ("data", "stats"):  # always written, null or not: a line without them was edited
            if key not in record:
                raise RecordError(f"{key}: missing")
        data = record.get("data")
        if data is not None and not (isinstance(data, dict) and isinstance(data.get("file"), str)
                                     and isinstance(data.get("key"), str)):
            raise RecordError("data: expected null or {\"file\": str, \"key\": str}")
        return cls(
            seq=_int(record, "seq"),
            rank=_int(record, "rank"),
            step=_int(record, "step"),
            module=_str(record, "module"),
            type=_str(record, "type", ""),
            call=_int(record, "call"),
            part=_str(record, "part"),
            path=_str(record, "path"),
            shape=_ints(record, "shape"),
            dtype=_str(record, "dtype"),
            device=_str(record, "device", ""),
            stats=_stats(record.get("stats")),
            data=None if data is None else {"file": _clean(data["file"]), "key": _clean(data["key"])},
            note=_str(record, "note", None),
            caller=_str(record, "caller", None),
            process=process,
        )


def entry_record(seq: int, rank: int, step: int, module: str, type_name: str, call: int, part: str, path: str,
                 shape: list[int] | tuple[int, ...], dtype: str, device: str, stats: dict[str, Any] | None,
                 data: dict[str, str] | None, note: str | None, caller: str | None) -> dict[str, Any]:
    """The manifest line of one entry, as a JSON object (:meth:`Entry.to_json`; the writer calls it with the
    capture's plain values, without making an ``Entry``)."""
    record = {"kind": "entry", "seq": seq, "rank": rank, "step": step, "module": module, "type": type_name,
              "call": call, "part": part, "path": path, "shape": shape, "dtype": dtype, "device": device,
              "stats": stats, "data": data, "note": note}
    if caller is not None:
        record["caller"] = caller
    return record


def _well_formed_entry(record: dict[str, Any], process: str) -> Entry | None:
    """The entry of a line as the writer writes it (every field of its type, names in ASCII), checked in
    one expression; None for anything else, which :meth:`Entry._checked` then reads field by field.
    (A dump holds tens of thousands of lines: this is most of the time spent opening one.)"""
    get = record.get
    seq, rank, step, call = get("seq"), get("rank"), get("step"), get("call")
    module, type_name, part, path = get("module"), get("type", ""), get("part"), get("path")
    shape, dtype, device = get("shape"), get("dtype"), get("device", "")
    stats, data, note, caller = get("stats", _REQUIRED), get("data", _REQUIRED), get("note"), get("caller")
    if not (type(seq) is int and type(rank) is int and type(step) is int and type(call) is int
            and type(module) is str and type(type_name) is str and type(part) is str and type(path) is str
            and type(dtype) is str and type(device) is str
            and (module + type_name + part + path + dtype + device).isascii()
            and type(shape) is list and (not shape or (set(map(type, shape)) == {int} and min(shape) >= 0))
            and (stats is None or (type(stats) is dict and set(map(type, stats.values())) <= _STAT_TYPES))
            and (note is None or (type(note) is str and note.isascii()))
            and (caller is None or (type(caller) is str and caller.isascii()))):
        return None
    if data is not None:
        if type(data) is not dict:
            return None
        file, key = data.get("file"), data.get("key")
        if not (type(file) is str and type(key) is str and (file + key).isascii()):
            return None
        data = {"file": file, "key": key}
    return Entry(seq, rank, step, module, type_name, call, part, path, shape, dtype, device, stats, data, note,
                 caller, process)


@dataclass
class StepRecord:
    """Marks a finished step of one process, with the token ids the root module was fed.

    Engines that batch requests into one flattened token dimension (vLLM) add, per step, the
    ``requests`` whose rows it holds (``id``, ``arrival``, ``start``, ``rows``, ``computed``,
    ``prompt_tokens``, ``logits_row``) and every row's ``positions``; ``note`` says why they are missing.
    """

    rank: int
    step: int
    token_ids: list[Any] | None
    entries: int
    requests: list[dict[str, Any]] | None = None
    positions: list[int] | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": "step", **{k: v for k, v in asdict(self).items()
                                   if v is not None or k in ("token_ids",)}}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> StepRecord:
        """Parse a step line; a missing or wrong-typed field raises :class:`RecordError` naming it."""
        token_ids = record.get("token_ids")
        if token_ids is not None and not (isinstance(token_ids, list) and all(
                _is_int(t) or (isinstance(t, list) and all(_is_int(u) for u in t)) for t in token_ids)):
            raise RecordError("token_ids: expected null or a list of token ids (or of lists of them)")
        requests = record.get("requests")
        if requests is not None:
            if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
                raise RecordError("requests: expected null or a list of objects")
            requests = [_request(r) for r in requests]
        positions = record.get("positions")
        return cls(_int(record, "rank"), _int(record, "step"), token_ids, _int(record, "entries"),
                   requests=requests, positions=None if positions is None else _ints(record, "positions"),
                   note=_str(record, "note", None))


#: The statistics of a tensor whose NaN/Inf could not be counted (it was changed in place before they were): all
#: null, ``nan`` and ``inf`` included; the entry's note says why.
UNKNOWN_STATS: dict[str, Any] = {"min": None, "max": None, "mean": None, "std": None, "norm": None, "nan": None,
                                 "inf": None}


def stats_unknown(stats: dict[str, Any] | None) -> bool:
    """Whether ``stats`` are :data:`UNKNOWN_STATS`: NaN/Inf were present, how many is not known."""
    return stats is not None and "nan" in stats and stats["nan"] is None


class RecordError(ValueError):
    """A manifest line whose fields are missing or of the wrong type."""


_REQUIRED = object()


def _is_int(value: object) -> bool:
    return type(value) is int


def _int(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    if not _is_int(value):
        raise RecordError(f"{key}: expected an integer, got {'nothing' if value is None else type(value).__name__}")
    return int(value)  # type: ignore[arg-type]


def _clean(text: str) -> str:
    # a lone surrogate (from a "\udfff" escape) is a str no file or terminal can encode: spell it out
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _str(record: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = record.get(key, default)
    if value is _REQUIRED:
        raise RecordError(f"{key}: missing")
    if value is None and default is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"{key}: expected a string, got {type(value).__name__}")
    return _clean(value)


def _ints(record: dict[str, Any], key: str) -> list[int]:
    value = record.get(key)
    # type(), not isinstance: a bool is not a dimension; map() keeps this off the interpreter loop
    if type(value) is not list or (value and not (set(map(type, value)) == {int} and min(value) >= 0)):
        raise RecordError(f"{key}: expected a list of non-negative integers")
    return list(value)


_STAT_TYPES = frozenset({int, float, str, bool, type(None)})


def _stats(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not set(map(type, value.values())) <= _STAT_TYPES:
        raise RecordError("stats: expected null or an object of numbers")
    return value


def _request(request: dict[str, Any]) -> dict[str, Any]:
    out = dict(request)
    out["id"] = _clean(str(request.get("id")))
    for key in ("start", "rows"):
        _int(request, key)
        if request[key] < 0:
            raise RecordError(f"requests.{key}: expected a non-negative integer")
    for key in ("arrival", "computed", "prompt_tokens", "logits_row"):
        if request.get(key) is not None:
            _int(request, key)
    return out
