"""Reusable memory for copies that only live until their statistics are read back.

In statistics mode a tensor is copied when its hook fires (the model may change it in place right
after) and dropped once its statistics are on the host. Copying into fresh memory costs a page fault
per 4 KiB on CPU and an allocation on accelerators; reusable memory, handed out front to back and reset
after each read-back, costs neither. Small copies (up to ``stats.GROUP_MAX`` elements) are rows of a matrix
per dtype and shape (:class:`Rows`); larger ones not reduced where their hook fires (inference tensors, and
every tensor with ``hash=True``) go into an :class:`Arena`.
"""

from __future__ import annotations

import torch

_ALIGN = 64


class Arena:
    """Bump allocator over one byte buffer per device; :meth:`reset` makes all of it free again."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._used: dict[torch.device, int] = {}

    def copy(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A copy of ``tensor`` in the arena, or None when it does not fit in what is left."""
        nbytes = tensor.numel() * tensor.element_size()
        device = tensor.device
        used = self._used.get(device, 0)
        if used + nbytes > self.capacity:
            return None
        buf = self._buffers.get(device)
        if buf is None:
            with torch.inference_mode(False):  # a normal tensor takes copies in and out of inference mode
                buf = self._buffers[device] = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        self._used[device] = used + (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        out = buf[used:used + nbytes].view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor.detach())
        return out

    def reset(self) -> None:
        """Everything handed out is free again (its statistics have been read back)."""
        self._used.clear()

    def release(self) -> None:
        """Give the memory back (the capture stopped)."""
        self._buffers.clear()
        self._used.clear()


#: The dtypes :class:`Rows` takes (complex, quantized and float8 copies are cloned, as before).
ROW_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
                        torch.int32, torch.int64, torch.uint8, torch.bool})


class Rows:
    """Copies of small tensors as the rows of reusable matrices, one per device, dtype and shape.

    A copy here leaves no tensor object behind: the statistics reduce the matrices whole (:meth:`stacked`). A
    decode step copies thousands of small tensors; kept as objects until the flush, Python's collector carried
    them into its oldest generation, whose full collections walk the whole heap (a fifth of a second with
    transformers loaded, once or twice a run at op level).
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[torch.device, torch.dtype, torch.Size], _Slot] = {}

    def copy(self, tensor: torch.Tensor, index: int,
             key: tuple[torch.device, torch.dtype, torch.Size] | None = None) -> None:
        """Copy ``tensor`` into the next row of its matrix; ``index`` is the copy's index in the capture's list,
        ``key`` the tensor's (device, dtype, shape) when the caller has them already."""
        if key is None:
            key = (tensor.device, tensor.dtype, tensor.shape)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        owners = slot.owners
        used = len(owners)
        if used == len(slot.rows):
            slot.grow(key, used)
        slot.rows[used].copy_(tensor)
        owners.append(index)

    def stacked(self) -> list[tuple[torch.Tensor, list[int]]]:
        """The rows copied since the last :meth:`reset`: a matrix per dtype and shape, and the index of each row."""
        return [(slot.matrix[:len(slot.owners)], slot.owners) for slot in self._slots.values() if slot.owners]

    def reset(self) -> None:
        """Every row is free again; matrices of a shape no copy took since the last reset are let go (a
        prompt's shapes are not seen again in decoding)."""
        for key in [key for key, slot in self._slots.items() if not slot.owners]:
            del self._slots[key]
        for slot in self._slots.values():
            slot.owners = []  # a list handed out by stacked() is not cleared under its holder

    def release(self) -> None:
        """Give the memory back (the capture stopped)."""
        self._slots.clear()

    def shapes(self) -> list[tuple[torch.device, torch.dtype, torch.Size]]:
        """The (device, dtype, shape) of each matrix held."""
        return list(self._slots)


class _Slot:
    """One (device, dtype, shape)'s matrix, its rows as views made once (indexing a row at each copy doubled
    its cost: 1.8 -> 0.9 us), and the copy each used row stands for."""

    __slots__ = ("matrix", "owners", "rows")

    def __init__(self) -> None:
        self.matrix = torch.empty(0)
        self.rows: list[torch.Tensor] = []
        self.owners: list[int] = []

    def grow(self, key: tuple[torch.device, torch.dtype, torch.Size], used: int) -> None:
        with torch.inference_mode(False):  # rows take copies in and out of inference mode
            matrix = torch.empty((max(64, 2 * used), *key[2]), dtype=key[1], device=key[0])
            self.rows = list(matrix.unbind(0))
        if used:
            matrix[:used].copy_(self.matrix[:used])
        self.matrix = matrix
