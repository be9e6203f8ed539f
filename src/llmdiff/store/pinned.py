"""Page-locked host memory that accelerator tensors are copied into on their way to disk.

A copy from an accelerator into ordinary (pageable) host memory holds the thread that asks for it until
the device has finished everything queued before it, once per tensor. A copy into page-locked ("pinned")
memory is queued on the device's stream like a kernel and the thread goes on; one event recorded after a
batch's copies tells the writer when all of them have landed. Pinning memory is slow (the pages are locked
one by one), so blocks are kept and handed out again once the tensors in them are on disk.

CPU tensors never come here: they are on the host already. :class:`HostStaging` itself does not care which
device a tensor is on; with ``pin_memory=False`` it runs the same steps on CPU tensors (the tests do).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

_ALIGN = 64
#: The smallest block allocated: a decode step's stored tensors of a small model share one block.
MIN_BLOCK = 8 << 20


class HostBlock:
    """One host buffer and the number of staged tensors still in it."""

    def __init__(self, size: int, pin_memory: bool) -> None:
        try:
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
            self.pinned = pin_memory
        except RuntimeError:  # pinning refused (limits, no allocator): a pageable block, copies synchronous
            self.buffer = torch.empty(size, dtype=torch.uint8)
            self.pinned = False
        self.users = 0

    @property
    def size(self) -> int:
        return self.buffer.numel()


class HostStaging:
    """Blocks of host memory for batches of device tensors; thread-safe between one thread that stages and
    one that releases (the capture and the writer)."""

    def __init__(self, pin_memory: bool, keep_bytes: int = 1 << 30) -> None:
        self.pin_memory = pin_memory
        self.keep_bytes = keep_bytes  # free blocks kept for reuse, in all
        self.allocated = 0  # blocks allocated so far (a measure of reuse)
        self._free: list[HostBlock] = []
        self._lock = threading.Lock()

    def stage(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], HostBlock, torch.Event | None]:
        """Host copies of ``tensors`` (all on one device) in one block, queued without waiting.

        Returns the copies, their block (give it back with :meth:`release`, once per copy) and the event to
        wait on before reading them (None when the copies are already done: a CPU source or a pageable block).
        """
        sizes = [t.numel() * t.element_size() for t in tensors]
        block = self._take(sum(_aligned(n) for n in sizes))
        copies, offset = [], 0
        for tensor, nbytes in zip(tensors, sizes, strict=True):
            copy = block.buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor.detach(), non_blocking=block.pinned)
            copies.append(copy)
            offset += _aligned(nbytes)
        block.users = len(copies)
        device = tensors[0].device if tensors else torch.device("cpu")
        if not block.pinned or device.type == "cpu":
            return copies, block, None
        event = torch.Event(device=device)
        event.record(torch.accelerator.current_stream(device))
        return copies, block, event

    def release(self, block: HostBlock) -> None:
        """One copy in ``block`` is no longer needed; the block is reused once none is."""
        with self._lock:
            block.users -= 1
            if block.users == 0 and sum(b.size for b in self._free) + block.size <= self.keep_bytes:
                self._free.append(block)

    def _take(self, nbytes: int) -> HostBlock:
        with self._lock:
            fitting = [b for b in self._free if b.size >= nbytes]
            if fitting:
                block = min(fitting, key=lambda b: b.size)
                self._free.remove(block)
                return block
        self.allocated += 1
        return HostBlock(-(-max(nbytes, 1) // MIN_BLOCK) * MIN_BLOCK, self.pin_memory)  # whole MIN_BLOCKs


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
