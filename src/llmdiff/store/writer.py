"""Writes one process folder of a dump: safetensors shards plus an append-only manifest.

File I/O runs in one background thread fed by a queue bounded in *bytes*: when the model
produces tensors faster than the disk takes them, ``add`` blocks (back-pressure) instead of
letting memory grow. With ``background=False`` the same work runs in the caller's thread instead
(see :func:`spare_cpu`). Crash safety comes from ordering alone:

1. tensors collect in memory up to ``shard_bytes``, then go to ``shard-N.safetensors.partial``;
2. the finished shard is renamed into place (atomic on POSIX);
3. only then are the manifest lines that point into it appended, followed at a step's end by a
   ``step`` line. A reader trusts a step only once its ``step`` line is there.

A SIGKILL at any moment therefore leaves complete steps readable, a leftover ``.partial`` file that
readers ignore, and at worst a torn last manifest line that readers skip.

Tensors on an accelerator reach the host without holding the capturing thread: :meth:`DumpWriter.add`
queues their copies into reusable page-locked blocks (:mod:`llmdiff.store.pinned`) with one event per
batch, and the writer thread waits on that event, never on a tensor.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import TensorSpec, serialize_file

from llmdiff.errors import LlmdiffError
from llmdiff.store.pinned import HostBlock, HostStaging
from llmdiff.store.schema import (
    MANIFEST_FILE,
    PARTIAL_SUFFIX,
    SHARD_TEMPLATE,
    StepRecord,
    encode_line,
    encode_lines,
    entry_record,
)

_CLOSE = object()

#: Manifest lines are encoded this many at a time. A record holding its statistics (a dict in a dict) is
#: tracked by Python's collector: thousands of them alive at once, a step's worth, were carried into its
#: oldest generation, whose full collections walk the whole heap.
RECORDS_PER_ENCODE = 256

#: One captured entry as the capture hands it over: a tuple of plain values (which Python's cycle collector
#: stops tracking), ``(seq, step, module, type, call, part, path, shape, dtype, device, note, caller, index,
#: same_as, keep)``. ``index`` >= 0: its copy is ``tensors[index]`` and its statistics ``stats[index]``, the copy
#: stored when ``keep``; ``same_as`` >= 0: it holds the same tensor as that earlier entry (by seq) of its step.
PendingEntry = tuple[int, int, str, str, int, str, str, tuple[int, ...], str, str, str | None, str | None, int, int,
                     bool]


class _Batch(NamedTuple):
    rank: int
    entries: list[PendingEntry]
    tensors: Sequence[torch.Tensor | None]  # by index, on the host; None where nothing is stored
    stats: list[dict[str, Any]]
    blocks: dict[int, HostBlock]  # by index: the host block of a copy staged from a device
    arriving: list[torch.Event]  # recorded after the staged copies: wait before reading them


def _on_device(tensor: torch.Tensor) -> bool:
    """Whether a stored copy has to be brought to the host (through :class:`HostStaging`)."""
    return tensor.device.type != "cpu"


def spare_cpu() -> bool:
    """Whether a background thread would have a core to itself, beyond torch's intra-op threads.

    When it would not, writing in the background costs more than writing in the model's own thread:
    each of torch's parallel regions waits at its barrier for the worker that the writer thread
    displaced (measured on 2 cores, SmolLM2 decode: the writer's ~2.5 us a manifest line cost ~12 us).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


class DumpWriter:
    """Background writer for one process folder. Call :meth:`close` to drain and finish."""

    def __init__(self, folder: Path, shard_bytes: int = 256 << 20, queue_bytes: int = 1 << 30,
                 background: bool = True) -> None:
        self.folder = folder
        self.background = background
        self.shard_bytes = shard_bytes
        self.queue_bytes = queue_bytes
        self.bytes_written = 0
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._budget = threading.Condition()
        self._in_flight = 0
        self._manifest = open(folder / MANIFEST_FILE, "ab")  # noqa: SIM115 - closed in _run
        # state owned by the writer thread
        self._shard_index = 0
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_size = 0
        # Lines are encoded as entries arrive and written once their shard is in place; no Entry object is made
        # (a step's thousands of live objects would cost Python's collector full passes over the program).
        self._pending: list[bytes] = []
        self._stored: dict[int, tuple[dict[str, str] | None, dict[str, Any] | None, str | None]] = {}
        self._shard_blocks: list[HostBlock] = []  # one item per staged copy in the current shard
        self.staging: HostStaging | None = None  # made when the first tensor on a device arrives
        self._thread = threading.Thread(target=self._run, name="llmdiff-writer", daemon=True)
        if background:
            self._thread.start()

    # -- called from the capturing thread -------------------------------------------------------
    def add(self, rank: int, entries: list[PendingEntry], tensors: Sequence[torch.Tensor | None],
            stats: list[dict[str, Any]]) -> None:
        """Queue entries of ``rank``, in order (see :data:`PendingEntry`); ``tensors`` are private copies (None
        where an entry is not stored), and ``stats`` their statistics."""
        self._raise_if_failed()
        # Only the copies to store travel on: the others (statistics only) are freed, or reused, now.
        stored: list[torch.Tensor | None] = [None] * len(tensors)
        size = 0
        on_device: dict[torch.device, list[int]] = {}
        for entry in entries:
            if entry[14] and (tensor := tensors[entry[12]]) is not None:
                stored[entry[12]] = tensor
                size += tensor.numel() * tensor.element_size()
                if _on_device(tensor):
                    on_device.setdefault(tensor.device, []).append(entry[12])
        blocks: dict[int, HostBlock] = {}
        arriving: list[torch.Event] = []
        for device, indices in on_device.items():
            if self.staging is None:
                self.staging = HostStaging(pin_memory=device.type != "cpu", keep_bytes=self.shard_bytes)
            copies, block, event = self.staging.stage([stored[i] for i in indices])  # type: ignore[misc]
            for i, copy in zip(indices, copies, strict=True):
                stored[i], blocks[i] = copy, block
            if event is not None:
                arriving.append(event)
        batch = _Batch(rank, entries, stored, stats, blocks, arriving)
        if not self.background:
            self._handle((batch, 0))
            return
        if size:
            with self._budget:
                while self._in_flight and self._in_flight + size > self.queue_bytes:
                    self._budget.wait()
                self._in_flight += size
        self._queue.put((batch, size))

    def end_step(self, record: StepRecord, wait: bool = False) -> None:
        """Mark a step complete: everything queued before is made durable, then the step line. With ``wait``,
        return only once the step line is written (an engine process may be killed right after a step)."""
        self._raise_if_failed()
        if not self.background:
            self._handle(record)
            self._raise_if_failed()
            return
        if not wait:
            self._queue.put(record)
            return
        done = threading.Event()
        self._queue.put((record, done))
        done.wait(timeout=60)

    def close(self) -> None:
        """Drain the queue and stop the thread. Raises if writing failed."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join()
        elif not self.background and not self._manifest.closed:
            try:
                self._handle(_CLOSE)
            finally:
                self._manifest.close()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise LlmdiffError(f"writing the dump to {self.folder} failed: {self.error}")

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _CLOSE:
                    self._handle(item)
                    return
                self._handle(item)
        finally:
            self._manifest.close()

    def _handle(self, item: Any) -> None:
        """Do one queued piece of work; a failure is kept in ``error`` for the capturing thread."""
        if item is _CLOSE:  # what was stored before any failure is still written
            try:
                self._commit()
            except BaseException as exc:
                self.error = self.error or exc
            return
        if self.error is not None:
            self._release(item)
            return
        try:
            if isinstance(item, tuple) and isinstance(item[0], StepRecord):  # a step someone waits for
                try:
                    self._end_step(item[0])
                finally:
                    item[1].set()
            elif isinstance(item, StepRecord):
                self._end_step(item)
            else:
                self._store(item[0])
        except BaseException as exc:  # reported to the capturing thread
            self.error = exc
        finally:
            self._release(item)

    def _end_step(self, record: StepRecord) -> None:
        self._commit()
        self._write_line(record.to_json())
        self._stored.clear()

    def _release(self, item: Any) -> None:
        if isinstance(item, tuple) and isinstance(item[1], threading.Event):
            item[1].set()  # a waited step after a failure: the capturing thread learns of it from the error
        elif isinstance(item, tuple) and item[1]:
            with self._budget:
                self._in_flight -= item[1]
                self._budget.notify_all()

    def _store(self, batch: _Batch) -> None:
        rank, tensors, stats, stored = batch.rank, batch.tensors, batch.stats, self._stored
        for event in batch.arriving:
            event.synchronize()
        records = []
        for seq, step, module, type_name, call, part, path, shape, dtype, device, note, caller, index, same_as, \
                keep in batch.entries:
            data: dict[str, str] | None = None
            stat: dict[str, Any] | None = None
            if index >= 0:
                stat = stats[index]
                tensor = tensors[index]
                if keep and tensor is not None:
                    key = str(seq)
                    self._shard[key] = tensor.contiguous()
                    self._shard_size += tensor.numel() * tensor.element_size()
                    if index in batch.blocks:
                        self._shard_blocks.append(batch.blocks[index])
                    data = {"file": SHARD_TEMPLATE.format(self._shard_index), "key": key}
                stored[seq] = (data, stat, note)
            elif same_as >= 0 and same_as in stored:
                data, stat, note = stored[same_as]
            records.append(entry_record(seq, rank, step, module, type_name, call, part, path, shape, dtype, device,
                                        stat, data, note, caller))
            if self._shard_size >= self.shard_bytes:
                self._pending.append(encode_lines(records))  # these lines point into the shard about to be committed
                records = []
                self._commit()
            elif len(records) == RECORDS_PER_ENCODE:
                self._pending.append(encode_lines(records))
                records = []
        self._pending.append(encode_lines(records))

    def _commit(self) -> None:
        """Put the current shard in place, then write the manifest lines that point into it."""
        if self._shard:
            final = self.folder / SHARD_TEMPLATE.format(self._shard_index)
            partial = final.with_name(final.name + PARTIAL_SUFFIX)
            # Tensors are handed to safetensors' serializer by pointer (they stay alive in self._shard): its
            # torch wrapper converts each through numpy, ~50 us a tensor, a step's worth every decode step.
            serialize_file({key: TensorSpec(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                                            data_ptr=t.data_ptr(), data_len=t.numel() * t.element_size())
                            for key, t in self._shard.items()}, str(partial), metadata=None)
            os.replace(partial, final)
            self.bytes_written += final.stat().st_size
            self._shard_index += 1
            self._shard, self._shard_size = {}, 0
            if self.staging is not None:
                for block in self._shard_blocks:
                    self.staging.release(block)
            self._shard_blocks.clear()
        self._manifest.write(b"".join(self._pending))
        self._pending.clear()
        self._manifest.flush()

    def _write_line(self, record: dict[str, Any]) -> None:
        self._manifest.write(encode_line(record))
        self._manifest.flush()
