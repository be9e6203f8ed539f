"""Reusable memory for copies that only live until their statistics are read back.

In statistics mode a tensor is copied when its hook fires (the model may change it in place right
after) and dropped once its statistics are on the host. Copying into fresh memory costs a page fault
per 4 KiB on CPU and an allocation on accelerators; an arena per device, handed out front to back
and reset after each read-back, costs neither.
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
