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

from dataclasses import asdict, dataclass
from typing import Any

FORMAT = "llmdiff-dump"
FORMAT_VERSION = 1

RUN_FILE = "run.json"
PROCESS_FILE = "process.json"
MANIFEST_FILE = "manifest.jsonl"
SHARD_TEMPLATE = "shard-{:06d}.safetensors"
PARTIAL_SUFFIX = ".partial"

#: part names; ``kwarg`` is an input passed by keyword, ``save`` a tensor given to ``llmdiff.save``,
#: ``param`` a module parameter or buffer (its ``path`` is the parameter's name).
PARTS = ("input", "kwarg", "output", "save", "param")


@dataclass
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
        record = {"kind": "entry", "seq": self.seq, "rank": self.rank, "step": self.step, "module": self.module,
                  "type": self.type, "call": self.call, "part": self.part, "path": self.path, "shape": self.shape,
                  "dtype": self.dtype, "device": self.device, "stats": self.stats, "data": self.data,
                  "note": self.note}
        if self.caller is not None:
            record["caller"] = self.caller
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any], process: str = "") -> Entry:
        return cls(
            seq=int(record["seq"]),
            rank=int(record["rank"]),
            step=int(record["step"]),
            module=str(record["module"]),
            type=str(record.get("type", "")),
            call=int(record["call"]),
            part=str(record["part"]),
            path=str(record["path"]),
            shape=[int(d) for d in record["shape"]],
            dtype=str(record["dtype"]),
            device=str(record.get("device", "")),
            stats=record.get("stats"),
            data=record.get("data"),
            note=record.get("note"),
            caller=record.get("caller"),
            process=process,
        )


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
        return cls(int(record["rank"]), int(record["step"]), record.get("token_ids"), int(record["entries"]),
                   requests=record.get("requests"), positions=record.get("positions"), note=record.get("note"))
